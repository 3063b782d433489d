"""CCIFAR10-DD corruptions (distill_core.data.corruptions) and their library ports (distill_core.data.ports) on
real images.

Images: scikit-learn's real digits coloured by the CMNIST-DD builder (RGB,
28x28), and the same resized to the CIFAR geometry (32x32).
"""

from __future__ import annotations

import hashlib
import io
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import distill_core.data.corruptions as C
from distill_core.data import SourceData, build_biased_dataset, load_source
from distill_core.data.corruptions import CORRUPTIONS, apply_corruption, corrupt_batch
from distill_core.data.ports import filters
from distill_core.data.ports.imagemagick import motion_blur_im
from distill_core.data.ports.libjpeg import jpeg_roundtrip
from distill_core.data.ports.skimage import hsv_to_rgb_sk, rgb_to_hsv_sk

SEVERITIES = (1, 2, 3, 4)
DETERMINISTIC = ("brightness", "contrast", "jpeg", "pixelate", "saturate")  # no random numbers


def grey_to_rgb_source(src: SourceData) -> SourceData:
    """Test helper: a real grey source as an RGB one (channels replicated), for the corrupted builder."""
    rgb = lambda x: x.expand(-1, 3, -1, -1).contiguous()  # noqa: E731
    return SourceData(f"{src.name}_rgb", rgb(src.train_images), src.train_labels,
                      rgb(src.test_images), src.test_labels, src.num_classes)


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


@pytest.fixture(scope="module")
def images(digits):
    """{'28': uint8 (80, 3, 28, 28) coloured digits, '32': the same at 32x32}."""
    x28 = build_biased_dataset(digits, "colored", 0.1, 1, seed=0).train_images[:80]
    x32 = F.interpolate(x28.float(), size=(32, 32), mode="bilinear", align_corners=False)
    return {"28": x28, "32": x32.round().clamp(0, 255).to(torch.uint8)}


def corrupt_all(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    attrs = torch.full((len(x),), CORRUPTIONS.index(name))
    return corrupt_batch(x, attrs, severity, torch.Generator().manual_seed(seed))


def mean_change(x: torch.Tensor, y: torch.Tensor) -> float:
    return (y.float() - x.float()).abs().mean().item()


def test_attribute_order_is_the_protocol():
    assert CORRUPTIONS == ["snow", "frost", "fog", "brightness", "contrast",
                           "spatter", "elastic", "jpeg", "pixelate", "saturate"]
    assert [C.hendrycks_level(s) for s in SEVERITIES] == [2, 3, 4, 5]


@pytest.mark.parametrize("size", ["28", "32"])
def test_output_dtype_shape_range(images, size):
    x = images[size]
    attrs = torch.arange(len(x)) % 10
    y = corrupt_batch(x, attrs, 3, torch.Generator().manual_seed(0))
    assert y.dtype == torch.uint8 and y.shape == x.shape
    for name in CORRUPTIONS:
        f = apply_corruption(name, x[:8].float() / 255, 3, torch.Generator().manual_seed(0))
        assert f.dtype == torch.float32 and f.shape == (8, *x.shape[1:])
        assert float(f.min()) >= 0.0 and float(f.max()) <= 1.0


@pytest.mark.parametrize("size", ["28", "32"])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_changes_images(images, name, size):
    x = images[size]
    for s in SEVERITIES:
        assert mean_change(x, corrupt_all(x, name, s)) > 0.5, (name, s)  # in 8-bit levels


@pytest.mark.parametrize("size", ["28", "32"])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_change_grows_with_severity(images, name, size):
    x = images[size]
    d = [mean_change(x, corrupt_all(x, name, s)) for s in SEVERITIES]
    if name == "frost":
        # Hendrycks' (image weight, frost weight) per level: (1, .3), (.9, .4), (.85, .4), (.75, .45).
        # From level 3 to 4 only the image weight drops, with the frost weight fixed, so bright
        # pixels lose some of the added frost: the mean change dips there on these images
        # (about 47.5, 60.1, 58.7, 64.0 levels with the real photographs).
        assert d[0] < d[1] and d[2] < d[3] and d[1] > d[2] and d[3] > d[0]
    elif name == "spatter":
        # levels 2-3 are water drops, levels 4-5 mud: two different corruptions, each growing
        assert d[0] < d[1] and d[2] < d[3]
    elif name == "elastic":
        # Hendrycks' CIFAR table shrinks the random affine jitter (0.07 -> 0.03 of the side, about
        # 2.2 -> 1 px) as it strengthens the elastic field (still sub-pixel), so pixels move less
        # at higher levels: the change decreases.
        assert d[0] > d[1] > d[2] > d[3]
    elif name == "saturate":
        # level 2 scales saturation by 0.1 (strong desaturation), levels 3-5 raise it (1.5, 2 +
        # 0.1, 2.5 + 0.2); these digit colours are already nearly fully saturated, so levels 3-5
        # all clip at S = 1 and give the same images.
        assert d[0] > d[1] and d[1] <= d[2] <= d[3]
    else:
        assert d[0] < d[1] < d[2] < d[3], d


@pytest.mark.parametrize("size", ["28", "32"])
def test_fixed_seed_gives_identical_bytes(images, size):
    x = images[size]
    attrs = torch.arange(len(x)) % 10
    a = corrupt_batch(x, attrs, 4, torch.Generator().manual_seed(5))
    b = corrupt_batch(x, attrs, 4, torch.Generator().manual_seed(5))
    c = corrupt_batch(x, attrs, 4, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    random = ~torch.isin(attrs, torch.tensor([CORRUPTIONS.index(n) for n in DETERMINISTIC]))
    assert not torch.equal(a[random], c[random])
    assert torch.equal(a[~random], c[~random])


# ------------------------------------------------------------------ against PIL / NumPy references
def _np_rgb2hsv(arr):  # skimage.color.rgb2hsv
    v = arr.max(-1)
    delta = np.ptp(arr, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = delta / v
        s[delta == 0] = 0
        h = np.zeros_like(v)
        i = arr[..., 0] == v
        h[i] = (arr[i, 1] - arr[i, 2]) / delta[i]
        i = arr[..., 1] == v
        h[i] = 2 + (arr[i, 2] - arr[i, 0]) / delta[i]
        i = arr[..., 2] == v
        h[i] = 4 + (arr[i, 0] - arr[i, 1]) / delta[i]
    h = (h / 6) % 1
    h[delta == 0] = 0
    return np.stack([h, s, v], -1)


def _np_hsv2rgb(hsv):  # skimage.color.hsv2rgb
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = np.stack([hi] * 3, -1).astype(np.uint8) % 6
    return np.choose(hi, np.stack([np.stack(c, -1) for c in
                                   ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]))


def reference(name: str, img: np.ndarray, level: int) -> np.ndarray:
    """make_cifar_c.py's function for one HWC uint8 image (deterministic corruptions only)."""
    if name == "pixelate":
        c, (h, w) = C.PIXELATE[level], img.shape[:2]
        out = Image.fromarray(img).resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)
        return np.array(out)
    if name == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=C.JPEG_QUALITY[level])
        return np.array(Image.open(buf))
    x = img / 255.0
    if name == "contrast":
        m = x.mean(axis=(0, 1), keepdims=True)
        out = (x - m) * C.CONTRAST[level] + m
    elif name == "brightness":
        hsv = _np_rgb2hsv(x)
        hsv[..., 2] = np.clip(hsv[..., 2] + C.BRIGHTNESS[level], 0, 1)
        out = _np_hsv2rgb(hsv)
    else:
        a, b = C.SATURATE[level]
        hsv = _np_rgb2hsv(x)
        hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
        out = _np_hsv2rgb(hsv)
    return np.uint8(np.clip(out, 0, 1) * 255)


@pytest.fixture(scope="module")
def varied(images):
    """Coloured digits on dim coloured backgrounds: all hues, saturations and greys occur."""
    x = images["32"].float()
    bg = torch.stack([x.roll(1, 0)[:, [1, 2, 0]], x.roll(2, 0)[:, [2, 0, 1]]]).mean(0).flip(-1) * 0.4
    return torch.where(x.amax(1, keepdim=True) > 0, x, bg).round().to(torch.uint8)


def channels_last(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def within_one_level(ours: np.ndarray, ref: np.ndarray, what) -> None:
    """float32 recipes against float64 references: one 8-bit level at most, rarely."""
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.06, (what, (diff > 0).mean())


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_match_the_reference(varied, name):
    for s in SEVERITIES:
        ours = channels_last(corrupt_all(varied, name, s))
        ref = np.stack([reference(name, im, s + 1) for im in channels_last(varied)])
        if name in ("jpeg", "pixelate"):
            np.testing.assert_array_equal(ours, ref, err_msg=f"{name} {s}")  # byte-identical
        else:  # brightness, saturate (closed forms), contrast: float32 here, float64 there
            within_one_level(ours, ref, (name, s))


@pytest.mark.parametrize("name", ["brightness", "saturate"])
def test_skimage_port_is_the_reference_and_the_closed_forms_are_within_one_level_of_it(varied, name):
    """ports.skimage computes skimage's rgb2hsv / hsv2rgb float for float (the oracle); the recipes' float32
    closed forms stay within one 8-bit level of it."""
    x = varied.to(torch.float64) / 255.0  # np.array(img) / 255.
    h, sat, v = rgb_to_hsv_sk(x)
    ref_hsv = _np_rgb2hsv(channels_last(x))
    np.testing.assert_array_equal(channels_last(torch.cat([h, sat, v], 1)), ref_hsv)  # equal float64 values
    for s in SEVERITIES:
        level = s + 1
        edited = ref_hsv.copy()
        if name == "brightness":
            v_new = (v + C.BRIGHTNESS[level]).clamp(0, 1)
            rgb = hsv_to_rgb_sk(h, sat, v_new)
            edited[..., 2] = np.clip(edited[..., 2] + C.BRIGHTNESS[level], 0, 1)
        else:
            a, b = C.SATURATE[level]
            rgb = hsv_to_rgb_sk(h, (sat * a + b).clamp(0, 1), v)
            edited[..., 1] = np.clip(edited[..., 1] * a + b, 0, 1)
        np.testing.assert_array_equal(channels_last(rgb), _np_hsv2rgb(edited))  # equal float64 values
        exact = channels_last((rgb.clamp(0, 1) * 255).to(torch.uint8))  # np.uint8(np.clip(out, 0, 1) * 255)
        ref = np.stack([reference(name, im, level) for im in channels_last(varied)])
        np.testing.assert_array_equal(exact, ref, err_msg=f"{name} {s}")  # and so the reference's bytes
        within_one_level(channels_last(corrupt_all(varied, name, s)), exact, (name, s))


@pytest.mark.parametrize("size", [(28, 28), (32, 32), (21, 19), (26, 30), (18, 12)])
def test_tensor_jpeg_codec_is_bit_exact_with_libjpeg(images, size):
    from torchvision.io import decode_jpeg, encode_jpeg

    x = F.interpolate(images["32"][:24].float(), size=size, mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    noise = torch.randint(0, 256, (8, 3, *size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for batch in (x, noise):
        for q in (40, 50, 58, 65, 80):
            ref = torch.stack(decode_jpeg(encode_jpeg(list(batch), quality=q)))
            assert torch.equal(jpeg_roundtrip(batch, q).to(torch.uint8), ref), (size, q)


def test_helpers_match_scipy():
    from scipy.ndimage import gaussian_filter, zoom

    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 28, 32, generator=g, dtype=torch.float64)
    for sigma, truncate, mode, sp_mode in ((0.8, 4.0, "nearest", "nearest"), (6.4, 3.0, "symmetric", "reflect"),
                                           (0.96, 3.0, "symmetric", "reflect")):
        ours = filters.gaussian_filter(a, sigma, truncate, mode)
        ref = np.stack([gaussian_filter(im[0], sigma, mode=sp_mode, truncate=truncate) for im in a.numpy()])
        np.testing.assert_allclose(ours[:, 0].numpy(), ref, atol=1e-12)
    layer = torch.rand(2, 1, 32, 32, generator=g, dtype=torch.float64)
    for z in (1.0, 1.25, 1.75, 2.25):  # Hendrycks' clipped_zoom (scipy zoom, order 1)
        h = 32
        ch = int(np.ceil(h / z))
        top = (h - ch) // 2
        ref = []
        for im in layer[:, 0].numpy():
            zz = zoom(im[top:top + ch, top:top + ch], z, order=1)
            t = (zz.shape[0] - h) // 2
            ref.append(zz[t:t + h, t:t + h])
        np.testing.assert_allclose(C._clipped_zoom(layer, z)[:, 0].numpy(), np.stack(ref), atol=1e-12)


def test_motion_blur_follows_imagemagick_definition():
    g = torch.Generator().manual_seed(0)
    layer = (torch.rand(3, 1, 12, 10, generator=g) * 255).floor()
    angles = torch.tensor([-90.0, -60.5, -130.0])
    ours = motion_blur_im(layer, 4, 2.0, angles)
    width = 9  # 2 * ceil(radius) + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * 2.0 ** 2))
    k /= k.sum()
    for n, a in enumerate(angles.tolist()):  # one-sided taps at (ceil(i cos - .5), ceil(i sin - .5)), edges clamped
        img = layer[n, 0].numpy()
        out = np.zeros_like(img, dtype=np.float64)
        for y in range(12):
            for x in range(10):
                for i in range(width):
                    dx = int(np.ceil(i * np.cos(np.deg2rad(a)) - 0.5))
                    dy = int(np.ceil(i * np.sin(np.deg2rad(a)) - 0.5))
                    out[y, x] += k[i] * img[min(max(y + dy, 0), 11), min(max(x + dx, 0), 9)]
        np.testing.assert_array_equal(ours[n, 0].numpy(), np.floor(np.floor(out * 257 + 0.5) / 257))


# ------------------------------------------------------------------ frost: the published photographs
FROST_SHA256 = {  # imagecorruptions 1.1.2 wheel, imagecorruptions/frost/ (= hendrycks/robustness ImageNet-C/create_c/)
    "frost1.png": "ff9f907860bd7a835d459e32f9d588062b7f61ee267343cc7222b56753a14755",
    "frost2.png": "fe211a89b336999c207a852ce05818d4545d0b57c5beadd824b4cc9d9a9b6137",
    "frost3.png": "2d0d50b4a9bb213f38b024ef7768731bb83cc08d2f26b5766bbc167cdfa0e504",
    "frost4.jpg": "3f8b91ca1a9fa7167b09e773da53f5ae60d0a1fd88f02a783f6e328a72887f6e",
    "frost5.jpg": "5fc6a19df4a429ba68abdcc8f8a4278d4c9f81c9ccafd2c92ab0c8cf8992ebd2",
}


def test_frost_photographs_are_the_published_files():
    assert C.FROST_FILES == tuple(FROST_SHA256)  # make_cifar_c.py: idx = np.random.randint(5) of six names
    assert C.frost_dir() == C.FROST_DIR
    for name, digest in FROST_SHA256.items():
        assert hashlib.sha256((C.FROST_DIR / name).read_bytes()).hexdigest() == digest, name
    assert "Apache License" in (C.FROST_DIR / "LICENSE").read_text()
    assert "imagecorruptions" in (C.FROST_DIR / "NOTICE").read_text()
    _, sizes = C.frost_bank("cpu")
    assert sizes.tolist() == [[120, 180], [63, 112], [63, 112], [70, 105], [99, 132]]  # 0.2 x (600x900, ...)


def _cv2_resize_linear_np(img: np.ndarray, f: float) -> np.ndarray:
    """cv2.resize(img, (0, 0), fx=f, fy=f) with INTER_LINEAR on uint8 (H, W, C), ported to NumPy.

    OpenCV's 8-bit path: output side cvRound(side * f); source position
    (d + 0.5) / f - 0.5 in float32, clamped at the borders; weights (1 - a, a)
    as 11-bit fixed point; horizontal pass into ints; vertical pass rounded as
    its vectorised VResizeLinear does. (Checked byte-identical to OpenCV 4.14
    at scales 0.2, 0.25, 0.3, 0.37, 0.71 on frost1/frost4; at 0.2 every weight
    is (1, 0).)
    """
    def taps(n_in, n_out):
        pos = ((np.arange(n_out) + 0.5) * (1.0 / f) - 0.5).astype(np.float32)
        s = np.floor(pos).astype(np.int64)
        a = (pos - s).astype(np.float32)
        a = np.where(s < 0, np.float32(0), a)
        s = np.maximum(s, 0)
        a = np.where(s >= n_in - 1, np.float32(0), a)
        s = np.minimum(s, n_in - 1)
        c1 = np.rint(a * np.float32(2048)).astype(np.int64)
        c0 = np.rint((np.float32(1) - a) * np.float32(2048)).astype(np.int64)
        return s, np.minimum(s + 1, n_in - 1), c0, c1

    h, w = img.shape[:2]
    oh, ow = int(np.rint(h * f)), int(np.rint(w * f))
    x0, x1, cx0, cx1 = taps(w, ow)
    y0, y1, cy0, cy1 = taps(h, oh)
    src = img.astype(np.int64)
    rows = src[:, x0] * cx0[None, :, None] + src[:, x1] * cx1[None, :, None]
    out = ((cy0[:, None, None] * (rows[y0] >> 4)) >> 16) + ((cy1[:, None, None] * (rows[y1] >> 4)) >> 16)
    return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def upstream_frost(img: np.ndarray, level: int, idx: int, x_start: int, y_start: int) -> np.ndarray:
    """make_cifar_c.py's frost on one HWC uint8 image, its two randint draws given (crop of the image's size).

    With OpenCV where installed (the reference's cv2.imread + cv2.resize), else
    PIL's decoding (the same libjpeg-turbo; alpha dropped as cv2.imread does)
    as BGR and the NumPy port of cv2.resize above.
    """
    c = [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)][level - 1]
    filename = str(C.frost_dir() / ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg"][idx])
    try:
        import cv2
    except ImportError:
        frost = np.array(Image.open(filename).convert("RGB"))[..., ::-1]  # cv2.imread: BGR
        frost = _cv2_resize_linear_np(frost, 0.2)
    else:
        frost = cv2.resize(cv2.imread(filename), (0, 0), fx=0.2, fy=0.2)
    h, w = img.shape[:2]
    assert 0 <= x_start < frost.shape[0] - h and 0 <= y_start < frost.shape[1] - w  # randint's ranges
    frost = frost[x_start:x_start + h, y_start:y_start + w][..., [2, 1, 0]]
    return np.clip(c[0] * np.array(img) + c[1] * frost, 0, 255)


@pytest.mark.parametrize("size", ["28", "32"])
def test_frost_matches_the_reference_recipe(images, varied, size):
    x = (varied if size == "32" else images["28"])[:6]
    h, w = x.shape[-2:]
    _, sizes = C.frost_bank("cpu")
    for level in (2, 3, 4, 5):
        for idx in range(5):
            th, tw = sizes[idx].tolist()
            for top, left in ((0, 0), (th - h - 1, tw - w - 1), (th // 3, tw // 2)):  # first, last, middle corners
                n = len(x)
                ours = C.frost_at(x, level, torch.full((n,), idx), torch.full((n,), top), torch.full((n,), left))
                ref = np.stack([upstream_frost(im, level, idx, top, left) for im in x.permute(0, 2, 3, 1).numpy()])
                # float64 there and here, same operations: equal values, and so equal np.uint8 bytes
                np.testing.assert_array_equal(ours.permute(0, 2, 3, 1).numpy(), ref)


def test_frost_draws_a_photograph_and_a_corner_per_image(varied):
    x = varied[:40].repeat(10, 1, 1, 1)  # 400 images
    n, (h, w) = len(x), x.shape[-2:]
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    out = C.frost(x, 4, g)
    g.set_state(state)  # the same draws, in the documented order: photographs, then rows, then columns
    _, sizes = C.frost_bank("cpu")
    idx = torch.floor(torch.rand(n, generator=g) * 5).long()
    top = torch.floor(torch.rand(n, generator=g) * (sizes[idx, 0] - h)).long()
    left = torch.floor(torch.rand(n, generator=g) * (sizes[idx, 1] - w)).long()
    assert torch.equal(out, C.frost_at(x, 4, idx, top, left))
    assert torch.bincount(idx, minlength=5).min() > 50  # all five photographs, about equally
    assert bool((top < sizes[idx, 0] - h).all() and (left < sizes[idx, 1] - w).all())  # randint's open bound
    with pytest.raises(ValueError, match="smaller than every scaled frost photograph"):
        C.frost(torch.zeros(1, 3, 63, 32, dtype=torch.uint8), 2, g)


def test_frost_falls_back_to_an_installed_imagecorruptions(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "imagecorruptions"
    (pkg / "frost").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    for name in FROST_SHA256:
        shutil.copy(C.FROST_DIR / name, pkg / "frost" / name)
    expected = C.frost_bank("cpu")
    monkeypatch.setattr(C, "FROST_DIR", tmp_path / "missing")
    monkeypatch.setattr(C, "_FROST_CACHE", {})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert C.frost_dir() == pkg / "frost"
    bank, sizes = C.frost_bank("cpu")
    assert torch.equal(bank, expected[0]) and torch.equal(sizes, expected[1])


def test_frost_without_photographs_names_where_it_looked(tmp_path, monkeypatch, images):
    shipped = C.FROST_DIR
    monkeypatch.setattr(C, "FROST_DIR", tmp_path / "no_frost")
    monkeypatch.setattr(C, "_FROST_CACHE", {})
    monkeypatch.setattr(C, "imagecorruptions_frost_dir", lambda: None)  # not installed
    x, attrs = images["32"][:2], torch.full((2,), CORRUPTIONS.index("frost"))
    with pytest.raises(FileNotFoundError) as err:
        corrupt_batch(x, attrs, 1, torch.Generator().manual_seed(0))
    msg = str(err.value)
    assert str(tmp_path / "no_frost") in msg and "frost1.png" in msg and "imagecorruptions" in msg
    partial = tmp_path / "ic_frost"  # installed, but incomplete
    partial.mkdir()
    shutil.copy(shipped / "frost1.png", partial / "frost1.png")
    monkeypatch.setattr(C, "imagecorruptions_frost_dir", lambda: partial)
    with pytest.raises(FileNotFoundError, match="looked in .*no_frost.* and in .*ic_frost"):
        C.frost_dir()


# ------------------------------------------------------------------ inputs and the builder
def test_invalid_inputs_are_rejected(images):
    x = images["28"][:4]
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError):
        corrupt_batch(x[:, :1], torch.zeros(4, dtype=torch.long), 1, g)  # grey
    with pytest.raises(ValueError):
        corrupt_batch(x, torch.tensor([0, 1, 2, 10]), 1, g)  # attribute 10
    with pytest.raises(ValueError):
        corrupt_batch(x, torch.zeros(4, dtype=torch.long), 5, g)  # severity 5 (level 6)
    with pytest.raises(ValueError):
        apply_corruption("motion_blur", x.float() / 255, 1, g)
    with pytest.raises(ValueError):
        corrupt_batch(x.float(), torch.zeros(4, dtype=torch.long), 1, g)  # floats: use apply_corruption
    empty = corrupt_batch(x[:0], torch.zeros(0, dtype=torch.long), 1, g)
    assert empty.shape == (0, 3, 28, 28) and empty.dtype == torch.uint8
    assert corrupt_batch(x, torch.tensor([3, 4, 8, 9], dtype=torch.int32), 1, g).shape == x.shape


def test_corrupted_builder_end_to_end(digits):
    src = grey_to_rgb_source(digits)
    # severity 3 (level 4): saturate also moves greys there (S' = 2 S + 0.1), so every image changes
    ds = build_biased_dataset(src, "corrupted", 0.8, 3, seed=0, max_per_class=30)
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape == (300, 3, 28, 28)
    counts = ds.counts()
    assert counts["train_aligned"] == [24] * 10 and counts["train_conflicting"] == [6] * 10
    assert counts["test_aligned"] == [0] * 10
    # each image carries the corruption of its attribute: deterministic ones are reproducible
    keep = torch.cat([torch.nonzero(src.train_labels == c).squeeze(1)[:30] for c in range(10)]).sort().values
    clean = src.train_images[keep]
    det = torch.isin(ds.train_attrs, torch.tensor([CORRUPTIONS.index(n) for n in DETERMINISTIC]))
    again = corrupt_batch(clean[det], ds.train_attrs[det], 3, torch.Generator().manual_seed(123))
    assert torch.equal(ds.train_images[det], again)
    changed = (ds.train_images.float() - clean.float()).abs().flatten(1).mean(1)
    assert float(changed.min()) > 0.0
    again = build_biased_dataset(src, "corrupted", 0.8, 3, seed=0, max_per_class=30)
    for name in ds.TENSOR_FIELDS:
        assert torch.equal(getattr(ds, name), getattr(again, name)), name
