"""CCIFAR10-DD corruptions (distill_core.data.corruptions) on real images.

Images: scikit-learn's real digits coloured by the CMNIST-DD builder (RGB,
28x28), and the same resized to the CIFAR geometry (32x32).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import distill_core.data.corruptions as C
from distill_core.data import SourceData, build_biased_dataset, load_source
from distill_core.data.corruptions import CORRUPTIONS, apply_corruption, corrupt_batch, jpeg_roundtrip


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
        # pixels lose some of the added frost: the mean change dips there on these images.
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


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("hsv_exact", [False, True])
def test_deterministic_corruptions_match_the_reference(varied, name, hsv_exact, monkeypatch):
    monkeypatch.setattr(C, "HSV_EXACT", hsv_exact)
    for s in SEVERITIES:
        ours = corrupt_all(varied, name, s).permute(0, 2, 3, 1).numpy().astype(int)
        ref = np.stack([reference(name, im, s + 1) for im in varied.permute(0, 2, 3, 1).numpy()]).astype(int)
        diff = np.abs(ours - ref)
        if hsv_exact or name in ("jpeg", "pixelate"):
            assert diff.max() == 0, (name, s)  # byte-identical
        else:  # float32 closed forms: one 8-bit level at most, rarely
            assert diff.max() <= 1 and (diff > 0).mean() < 0.06, (name, s, (diff > 0).mean())


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
        ours = C._gaussian(a, sigma, truncate, mode)
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
    ours = C.motion_blur_im(layer, 4, 2.0, angles)
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


def test_frost_textures_are_fixed_assets():
    bank = C.frost_bank("cpu")
    assert bank.shape == (5, 3, 160, 224)
    assert torch.equal(bank, C.frost_texture(5, 160, 224, torch.Generator().manual_seed(C.FROST_BANK_SEED), "cpu"))
    t = bank / 255
    assert abs(float(t.mean()) - 0.5) < 0.03 and 0.12 < float(t.std()) < 0.18
    assert float(t[:, 0].mean()) < float(t[:, 2].mean())  # pale blue-white


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
