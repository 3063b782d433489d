"""Differentiable siamese augmentation: shared parameters for real and synthetic batches."""

from __future__ import annotations

import pytest
import torch

from distill_core.augment import DEFAULT_STRATEGY, FAMILIES, SiameseAugment


def images(seed: int, n: int, channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", [DEFAULT_STRATEGY, *FAMILIES])
@pytest.mark.parametrize("mode", ["S", "M"])
def test_real_and_synthetic_get_identical_transforms(strategy, mode):
    """A probe image placed in both batches (same group) comes out identical under one seed."""
    augment = SiameseAugment(strategy, mode=mode)
    probe = images(0, 1)
    for seed in range(5):
        real = torch.cat([images(1, 7), probe])  # different content and batch sizes
        syn = torch.cat([probe, images(2, 2)])
        out_real = augment(real, seed)
        out_syn = augment(syn, seed)
        torch.testing.assert_close(out_real[-1], out_syn[0], rtol=0, atol=1e-6)


def test_groups_get_their_own_parameters_and_match_per_class_calls():
    """A batched call with class groups equals one call per class (what DC/DSA/DM rely on)."""
    augment = SiameseAugment()
    k = 4
    labels = torch.arange(k).repeat_interleave(3)
    x = images(3, len(labels))
    batched = augment(x, 11, labels, k)
    for c in range(k):
        block = labels == c
        alone = augment(x[block], 11, torch.full((int(block.sum()),), c), k)
        torch.testing.assert_close(batched[block], alone, rtol=0, atol=1e-6)
    # the same image in two groups is transformed differently for some seed
    same = images(4, 1).expand(2, -1, -1, -1).contiguous()
    assert any(not torch.allclose(*augment(same, s, torch.tensor([0, 1]), 2)) for s in range(10))


def test_seeds_change_the_transform_and_repeat_exactly():
    augment = SiameseAugment()
    x = images(5, 4)
    torch.testing.assert_close(augment(x, 3), augment(x, 3), rtol=0, atol=0)
    assert any(not torch.allclose(augment(x, 3), augment(x, s)) for s in range(4, 10))


def test_augmentation_is_differentiable():
    augment = SiameseAugment(mode="M")  # every family in one pass
    x = images(6, 3).requires_grad_(True)
    augment(x, 0).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_strategy_is_rejected():
    with pytest.raises(ValueError):
        SiameseAugment("color_warp")
    assert SiameseAugment("")(images(7, 2), 0).equal(images(7, 2))  # empty strategy: identity


# --- the siamese call's random stream is pinned --------------------------------------------------

from distill_core.augment import (  # noqa: E402
    APPLY,
    DSA_STRATEGY,
    DSA_STRATEGY_NO_FLIP,
    DCAugment,
    _dc_rotate,
    _dc_scale,
    make_augmentation,
)


def reference_siamese(aug, x, seed, groups=None, num_groups=None):
    """A copy of SiameseAugment.__call__ as it was when per_sample was added."""
    if groups is None:
        groups = torch.zeros(len(x), dtype=torch.long)
        num_groups = 1
    g = torch.Generator().manual_seed(int(seed))
    if aug.mode == "S":
        choice = torch.randint(len(aug.families), (num_groups,), generator=g)
    for fam_idx, fam in enumerate(aug.families):
        params = FAMILIES[fam](num_groups, g, aug.ratios, x.shape[-2:])
        if aug.mode == "M":
            x = APPLY[fam](x, {k: v[groups] for k, v in params.items()})
            continue
        sel = (choice == fam_idx)[groups]
        if bool(sel.any()):
            out = x.clone()
            out[sel] = APPLY[fam](x[sel], {k: v[groups[sel]] for k, v in params.items()})
            x = out
    return x


@pytest.mark.parametrize("mode", ["S", "M"])
def test_siamese_call_is_bit_identical_to_the_reference(mode):
    augment = SiameseAugment(mode=mode)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    x = images(20, len(labels))
    for seed in range(6):
        assert augment(x, seed).equal(reference_siamese(augment, x, seed))
        assert augment(x, seed, labels, 3).equal(reference_siamese(augment, x, seed, labels, 3))


# --- SiameseAugment.per_sample ----------------------------------------------------------------

def identical(n: int, seed: int = 21, size: int = 16) -> torch.Tensor:
    """n copies of one image with no zeros and no symmetry."""
    return (images(seed, 1, size=size).abs() + 1).expand(n, -1, -1, -1).contiguous()


def test_per_sample_gives_every_image_its_own_crop():
    x = identical(8)
    shifts = {(tx, ty): APPLY["crop"](x[:1], {"tx": torch.tensor([tx]), "ty": torch.tensor([ty])})[0]
              for tx in range(-2, 3) for ty in range(-2, 3)}  # crop ratio 0.125 of 16 pixels
    out = SiameseAugment("crop").per_sample(x, 0)
    drawn = []
    for img in out:
        match = [s for s, ref in shifts.items() if img.equal(ref)]
        assert len(match) == 1  # every output is exactly one allowed shift of the input
        drawn.append(match[0])
    assert len(set(drawn)) > 1  # ... and not the same shift for all
    assert SiameseAugment("crop")(x, 0).unique(dim=0).shape[0] == 1  # siamese: one shift for all


def test_per_sample_mode_s_applies_one_family_to_the_whole_batch():
    x = identical(8)
    seen = {"flip": 0, "cutout": 0}
    augment = SiameseAugment("flip_cutout")
    for seed in range(12):
        out = augment.per_sample(x, seed)
        kinds = set()
        for img in out:
            if img.equal(x[0]) or img.equal(x[0].flip(2)):
                kinds.add("flip")
            else:  # a cutout: a zero hole, the rest untouched (never flipped)
                hole = img == 0
                assert hole.any() and img[~hole].equal(x[0][~hole])
                kinds.add("cutout")
        assert len(kinds) == 1, f"seed {seed}: families {kinds} in one batch"
        family = kinds.pop()
        seen[family] += 1
        if family == "flip":  # the coin is per sample
            flipped = [img.equal(x[0].flip(2)) for img in out]
            assert any(flipped) and not all(flipped)
        else:  # the hole moves per sample
            assert out.unique(dim=0).shape[0] > 1
    assert seen["flip"] > 0 and seen["cutout"] > 0


def test_per_sample_mode_m_applies_every_family_per_sample():
    x = identical(6)
    out = SiameseAugment("cutout_flip", mode="M").per_sample(x, 1)
    assert all((img == 0).any() for img in out)  # every image has a hole (and maybe a flip)
    assert out.unique(dim=0).shape[0] > 1


@pytest.mark.parametrize("mode", ["S", "M"])
def test_per_sample_is_seeded_and_ignores_image_values(mode):
    augment = SiameseAugment(mode=mode)
    x = images(22, 5)
    torch.testing.assert_close(augment.per_sample(x, 3), augment.per_sample(x, 3), rtol=0, atol=0)
    assert all(not torch.allclose(augment.per_sample(x, 3), augment.per_sample(x, s)) for s in range(4, 8))
    # parameters do not depend on x: the geometric families are linear in the image
    geometric = SiameseAugment("crop_cutout_flip_scale_rotate", mode=mode)
    for seed in range(4):
        torch.testing.assert_close(geometric.per_sample(2 * x, seed), 2 * geometric.per_sample(x, seed),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["S", "M"])
def test_per_sample_is_differentiable(mode):
    augment = SiameseAugment(mode=mode)
    for seed in range(3):
        x = images(23, 3).requires_grad_(True)
        augment.per_sample(x, seed).pow(2).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


# --- DCAugment ---------------------------------------------------------------------------------

def test_dc_is_seeded_and_keeps_shape_and_dtype():
    augment = DCAugment()
    for dtype in (torch.float32, torch.float64):
        x = images(30, 6, size=12).to(dtype)
        out = augment.per_sample(x, 5)
        assert out.shape == x.shape and out.dtype == dtype
        assert out.equal(augment.per_sample(x, 5))
        assert not torch.allclose(out, augment.per_sample(x, 6))
    assert DCAugment("").per_sample(x, 0) is x


def test_dc_crop_is_a_shift_of_at_most_crop_pixels_with_batch_mean_fill():
    x = images(31, 64, size=10) + torch.arange(64.0)[:, None, None, None] / 8  # batch mean != image mean
    mean = x.mean(dim=(0, 2, 3))
    padded = mean[None, :, None, None].expand(64, -1, 18, 18).clone()
    padded[:, :, 4:14, 4:14] = x
    out = DCAugment("crop").per_sample(x, 0)
    offsets = []
    for i in range(64):  # upstream: window at (r, c) of the mean-padded image, r, c in {0..7}
        match = [(r, c) for r in range(9) for c in range(9) if out[i].equal(padded[i, :, r:r + 10, c:c + 10])]
        assert len(match) == 1
        offsets.append(match[0])
    rows, cols = zip(*offsets)
    assert set(rows) == set(range(8)) and set(cols) == set(range(8))  # the whole range, no more
    i = next(i for i, (r, c) in enumerate(offsets) if r < 4 and c < 4)  # fill visible top-left
    r, c = offsets[i]
    assert out[i, :, :4 - r, :].equal(mean[:, None, None].expand(-1, 4 - r, 10))
    assert out[i, :, 4 - r:, 4 - c:].equal(x[i, :, :6 + r, :6 + c])


def test_dc_noise_adds_gaussian_noise_of_the_given_std():
    x = images(32, 16, size=32)
    diff = DCAugment("noise").per_sample(x, 0) - x
    assert 0.00095 < float(diff.std()) < 0.00105 and abs(float(diff.mean())) < 2e-5
    big = DCAugment("noise", noise=0.1).per_sample(x, 0) - x
    torch.testing.assert_close(big, diff * 100, rtol=0, atol=1e-4)  # same draw, scaled (float32 rounding)


def test_dc_scale_of_one_and_rotation_by_zero_keep_the_image():
    x = images(33, 4, size=16)
    assert DCAugment("scale", scale=0.0).per_sample(x, 0).equal(x)
    assert _dc_scale(x, torch.full((4,), 16), torch.full((4,), 16)).equal(x)
    torch.testing.assert_close(_dc_rotate(x, torch.zeros(4, dtype=torch.long), torch.tensor(0.7)), x,
                               rtol=0, atol=1e-5)


def upstream_scale(img, h, w):
    """DC's scalefun for one image (C, H, W) and drawn sizes (h, w)."""
    ch, height, width = img.shape
    tmp = torch.nn.functional.interpolate(img[None], [h, w])[0]
    m = max(h, w, height, width)
    canvas = torch.zeros(ch, m, m)
    r, c = int((m - h) / 2), int((m - w) / 2)
    canvas[:, r:r + h, c:c + w] = tmp
    r, c = int((m - height) / 2), int((m - width) / 2)
    return canvas[:, r:r + height, c:c + width]


@pytest.mark.parametrize("size", [(16, 16), (15, 12)])
def test_dc_scale_matches_upstream_exactly(size):
    sizes = [(12, 12), (13, 19), (19, 13), (20, 11), (16, 17), (9, 14), (32, 7), size]
    x = torch.randn(len(sizes), 2, *size, generator=torch.Generator().manual_seed(34))
    sh, sw = (torch.tensor(s) for s in zip(*sizes))
    out = _dc_scale(x, sh, sw)
    for i, (h, w) in enumerate(sizes):
        assert out[i].equal(upstream_scale(x[i], h, w)), (h, w)


def test_dc_scale_draws_both_sizes_from_the_height():
    """Upstream quirk kept: w = int(U * H), so a wide image shrinks to a narrow strip."""
    x = torch.rand(8, 1, 8, 32, generator=torch.Generator().manual_seed(38)) + 1  # no zeros
    out = DCAugment("scale").per_sample(x, 0)
    kept_columns = (out != 0).any(dim=2).sum(dim=-1)  # int(U(0.8, 1.2) * 8) is at most 9
    assert bool((kept_columns <= 9).all()) and bool((kept_columns >= 6).all())


@pytest.mark.parametrize("size", [16, 17])
def test_dc_rotate_matches_scipy_geometry(size):
    """Same geometry as upstream's scipy.ndimage.rotate (reshape, centred crop), bilinear."""
    ndimage = pytest.importorskip("scipy.ndimage")
    angles = torch.tensor([-45, -30, -7, 0, 13, 44, 90, 180])
    x = images(35, len(angles), size=size)
    out = _dc_rotate(x, angles, torch.tensor(0.3))
    for i, a in enumerate(angles.tolist()):
        ref = ndimage.rotate(x[i].double().numpy(), a, axes=(-2, -1), order=1, mode="grid-constant", cval=0.3)
        r, c = int((ref.shape[-2] - size) / 2), int((ref.shape[-1] - size) / 2)
        ref = torch.from_numpy(ref[:, r:r + size, c:c + size]).float()
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[6], x[6].rot90(1, dims=(1, 2)), rtol=0, atol=1e-5)
    # upstream's fill is the mean of the batch's channel means, angles are integers in [-45, 45)
    flat = torch.ones(3, 3, size, size) * torch.tensor([1.0, 2.0, 6.0])[:, None, None, None]
    rotated = DCAugment("rotate").per_sample(flat, 0)
    assert torch.isclose(rotated[:, :, 0, 0], torch.tensor(3.0), atol=1e-5).any()  # corners filled


def test_dc_chooses_the_op_per_image():
    x = images(36, 32)
    out = DCAugment("scale_noise", scale=0.0).per_sample(x, 0)  # scale 0 is the identity
    unchanged = torch.tensor([o.equal(i) for o, i in zip(out, x)])
    assert unchanged.any() and not unchanged.all()
    assert (out - x)[~unchanged].abs().amax() < 0.01  # the others got the noise


def test_dc_rejects_unknown_ops():
    with pytest.raises(ValueError, match=r"blur.*crop"):
        DCAugment("crop_blur")


# --- make_augmentation ---------------------------------------------------------------------------

def test_strategy_constants():
    assert DEFAULT_STRATEGY == DSA_STRATEGY
    assert SiameseAugment(DSA_STRATEGY_NO_FLIP).families == [f for f in DSA_STRATEGY.split("_") if f != "flip"]


def test_make_augmentation_parses_names():
    assert make_augmentation(None) is None and make_augmentation("none") is None
    dsa = make_augmentation("dsa:color_crop_cutout_scale_rotate")
    assert isinstance(dsa, SiameseAugment) and dsa.families == ["color", "crop", "cutout", "scale", "rotate"]
    dc = make_augmentation("dc:crop_scale_rotate")
    assert isinstance(dc, DCAugment) and dc.ops == ["crop", "scale", "rotate"]
    assert make_augmentation("dc:crop_noise").ops == ["crop", "noise"]
    x = images(37, 2)
    assert dsa.per_sample(x, 0).shape == dc.per_sample(x, 0).shape == x.shape


@pytest.mark.parametrize("name", ["", "dsa", "dsa:", "crop", "dc:warp", "dsa:crop_warp", "dcx:crop", "mtt:crop"])
def test_make_augmentation_rejects_bad_names(name):
    with pytest.raises(ValueError) as err:
        make_augmentation(name)
    message = str(err.value)
    assert "\n" not in message and repr(name) in message
