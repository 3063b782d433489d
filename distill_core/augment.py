"""Image augmentation for distillation and evaluation: DSA (siamese and per-sample) and DC's.

`SiameseAugment` is differentiable siamese augmentation (DSA, Zhao & Bilen 2021):
- `aug(x, seed, groups, num_groups)` is the siamese mode, upstream's
  `DiffAugment(x, strategy, seed, param)` with `Siamese=True`. Real and synthetic
  batches are transformed with the *same* random parameters: call it twice with
  the same `seed` (and the same number of groups) and both calls draw identical
  parameters. Upstream draws one parameter set per class call; here `groups`
  (usually the class index of every sample) lets one batched call stand in for
  the per-class loop: each group gets its own parameters, shared by its samples.
  Mode "S" (upstream's default) applies one randomly chosen transform family per
  group; mode "M" applies all of them in order.
- `aug.per_sample(x, seed)` is the non-siamese mode, upstream's
  `DiffAugment(x, strategy, seed=-1, param)` as used for evaluation and network
  training: mode "S" picks ONE family for the whole batch and draws that family's
  parameters per sample; mode "M" applies every family, each per sample.
Every op is differentiable with respect to the images, so gradients flow back
into the synthetic set.

`DCAugment` is DatasetCondensation's non-differentiable `utils.augment` (DC's
evaluation on MNIST uses "crop_scale_rotate", BatchNorm nets "crop_noise"):
every image independently gets ONE op of the strategy, with its own parameters.

`make_augmentation("dsa:<strategy>" | "dc:<strategy>" | "none")` builds either;
both expose `per_sample(x, seed)`.

Deviations from upstream, and why:
- Randomness comes from a torch.Generator seeded by `seed` (CPU, independent of
  the images and of the device) instead of the global numpy/torch state, so every
  call is reproducible and replayable.
- DCAugment rotates with bilinear interpolation (grid_sample) instead of
  scipy.ndimage.rotate's cubic spline, and samples outside the image blend
  towards the fill value like scipy's mode="grid-constant" (upstream's
  mode="constant" cuts to the fill at the border): one vectorised op on the
  device instead of a per-image round trip through numpy. The geometry (integer
  angle in [-rotate, rotate), scipy's reshaped output plane, the centred crop,
  the fill = mean of the batch's channel means) is upstream's.
- DCAugment is vectorised (one gather / grid_sample per op over the images that
  drew it) and returns a new tensor; upstream loops over images and overwrites
  its input in place. Gradients do flow through it; no caller relies on that.
- DCAugment keeps upstream's quirks on purpose: both scale sizes are drawn from
  the height (non-square images get height-based widths), the scaled image is
  pasted on a zero canvas (not the mean), and crop offsets are {0..2*crop-1},
  so shifts run from -crop to crop-1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
DSA_STRATEGY_NO_FLIP = "color_crop_cutout_scale_rotate"  # upstream: no flip for digits
DEFAULT_STRATEGY = DSA_STRATEGY


class SiameseAugment:
    def __init__(self, strategy: str = DEFAULT_STRATEGY, mode: str = "S",
                 scale: float = 1.2, rotate_deg: float = 15.0, crop: float = 0.125, cutout: float = 0.5):
        self.families = [f for f in strategy.split("_") if f]
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown DSA transform(s) {sorted(unknown)}; known: {sorted(FAMILIES)}")
        if mode not in ("S", "M"):
            raise ValueError("mode must be 'S' (one transform per group) or 'M' (all)")
        self.mode = mode
        self.ratios = {"scale": scale, "rotate": rotate_deg, "crop": crop, "cutout": cutout}

    def __call__(self, x: torch.Tensor, seed: int, groups: torch.Tensor | None = None,
                 num_groups: int | None = None) -> torch.Tensor:
        if not self.families:
            return x
        if groups is None:
            groups = torch.zeros(len(x), dtype=torch.long, device=x.device)
            num_groups = 1
        num_groups = int(num_groups if num_groups is not None else int(groups.max()) + 1)
        g = torch.Generator().manual_seed(int(seed))
        if self.mode == "S":
            choice = torch.randint(len(self.families), (num_groups,), generator=g)
        for fam_idx, fam in enumerate(self.families):
            # parameters are drawn for every family in a fixed order, so the
            # random stream (hence real/synthetic agreement) never depends on x
            params = FAMILIES[fam](num_groups, g, self.ratios, x.shape[-2:])
            if self.mode == "M":
                x = APPLY[fam](x, {k: v.to(x.device)[groups] for k, v in params.items()})
                continue
            sel = (choice == fam_idx).to(x.device)[groups]
            if bool(sel.any()):
                sub = {k: v.to(x.device)[groups[sel]] for k, v in params.items()}
                x = _scatter(x, sel, APPLY[fam](x[sel], sub))
        return x

    def per_sample(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """Non-siamese DSA: every sample gets its own parameters.

        Mode "S" picks one family for the whole batch, mode "M" applies all in
        order; upstream's `DiffAugment(x, strategy, seed=-1, param)`.
        """
        if not self.families:
            return x
        g = torch.Generator().manual_seed(int(seed))
        families = self.families
        if self.mode == "S":
            families = [families[int(torch.randint(len(families), (1,), generator=g))]]
        for fam in families:
            params = FAMILIES[fam](len(x), g, self.ratios, x.shape[-2:])
            x = APPLY[fam](x, {k: v.to(x.device) for k, v in params.items()})
        return x


def _scatter(x, sel, values):
    out = x.clone()  # out-of-place, so autograd sees both branches
    out[sel] = values
    return out


# --- parameter samplers: (num_groups, generator, ratios, (H, W)) -> dict of tensors --------------

def _color_params(n, g, r, hw):
    return {"bright": torch.rand(n, generator=g) - 0.5,
            "sat": torch.rand(n, generator=g) * 2.0,
            "contrast": torch.rand(n, generator=g) + 0.5}


def _crop_params(n, g, r, hw):
    sx, sy = int(hw[0] * r["crop"] + 0.5), int(hw[1] * r["crop"] + 0.5)
    return {"tx": torch.randint(-sx, sx + 1, (n,), generator=g),
            "ty": torch.randint(-sy, sy + 1, (n,), generator=g)}


def _cutout_params(n, g, r, hw):
    cx, cy = int(hw[0] * r["cutout"] + 0.5), int(hw[1] * r["cutout"] + 0.5)
    return {"ox": torch.randint(0, hw[0] + (1 - cx % 2), (n,), generator=g),
            "oy": torch.randint(0, hw[1] + (1 - cy % 2), (n,), generator=g),
            "size": torch.tensor([cx, cy]).expand(n, 2)}


def _flip_params(n, g, r, hw):
    return {"flip": torch.rand(n, generator=g) < 0.5}


def _scale_params(n, g, r, hw):
    lo, hi = 1.0 / r["scale"], r["scale"]
    return {"sx": torch.rand(n, generator=g) * (hi - lo) + lo,
            "sy": torch.rand(n, generator=g) * (hi - lo) + lo}


def _rotate_params(n, g, r, hw):
    return {"theta": (torch.rand(n, generator=g) - 0.5) * 2 * r["rotate"] / 180 * math.pi}


FAMILIES = {"color": _color_params, "crop": _crop_params, "cutout": _cutout_params,
            "flip": _flip_params, "scale": _scale_params, "rotate": _rotate_params}


# --- differentiable ops: (x, per-sample params) -> x ------------------------------------------

def _color(x, p):
    x = x + p["bright"].to(x.dtype)[:, None, None, None]
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * p["sat"].to(x.dtype)[:, None, None, None] + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * p["contrast"].to(x.dtype)[:, None, None, None] + mean


def _crop(x, p):
    n, _, h, w = x.shape
    dev = x.device
    gy, gx = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    iy = (gy[None] + p["ty"][:, None, None] + 1).clamp(0, h + 1)
    ix = (gx[None] + p["tx"][:, None, None] + 1).clamp(0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    idx = (iy * (w + 2) + ix).reshape(n, 1, -1).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, idx).reshape_as(x)


def _cutout(x, p):
    n, _, h, w = x.shape
    dev = x.device
    cx, cy = p["size"][:, 0], p["size"][:, 1]
    ox = p["ox"] - cx // 2
    oy = p["oy"] - cy // 2
    ys = torch.arange(h, device=dev)[None, :]
    xs = torch.arange(w, device=dev)[None, :]
    in_y = (ys >= ox[:, None]) & (ys < (ox + cx)[:, None])  # upstream uses offset_x on rows
    in_x = (xs >= oy[:, None]) & (xs < (oy + cy)[:, None])
    mask = ~(in_y[:, :, None] & in_x[:, None, :])
    return x * mask[:, None].to(x.dtype)


def _flip(x, p):
    return torch.where(p["flip"][:, None, None, None], x.flip(3), x)


def _affine(x, theta):
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x, p):
    z = torch.zeros_like(p["sx"])
    theta = torch.stack([torch.stack([p["sx"], z, z], 1), torch.stack([z, p["sy"], z], 1)], 1)
    return _affine(x, theta)


def _rotate(x, p):
    t = p["theta"]
    z = torch.zeros_like(t)
    theta = torch.stack([torch.stack([t.cos(), -t.sin(), z], 1), torch.stack([t.sin(), t.cos(), z], 1)], 1)
    return _affine(x, theta)


APPLY = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


# --- DatasetCondensation's utils.augment ---------------------------------------------------------

DC_OPS = ("crop", "scale", "rotate", "noise")


class DCAugment:
    """DC's `utils.augment`: every image gets one op of `strategy`, chosen uniformly."""

    def __init__(self, strategy: str = "crop_scale_rotate", crop: int = 4, scale: float = 0.2,
                 rotate: int = 45, noise: float = 0.001):
        self.ops = [o for o in strategy.split("_") if o]
        unknown = set(self.ops) - set(DC_OPS)
        if unknown:
            raise ValueError(f"unknown DC augmentation op(s) {sorted(unknown)}; known: {sorted(DC_OPS)}")
        if "crop" in self.ops and int(crop) < 1:
            raise ValueError("crop must be >= 1 pixel (offsets are drawn from {0, ..., 2*crop-1})")
        if "rotate" in self.ops and int(rotate) < 1:
            raise ValueError("rotate must be >= 1 degree (angles are drawn from [-rotate, rotate))")
        self.strategy = strategy
        self.crop, self.scale, self.rotate, self.noise = int(crop), float(scale), int(rotate), float(noise)

    def per_sample(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """One op per image, with per-image parameters; deterministic given `seed`."""
        if not self.ops or len(x) == 0:
            return x
        n, ch, h, w = x.shape
        g = torch.Generator().manual_seed(int(seed))
        choice = torch.randint(len(self.ops), (n,), generator=g)  # np.random.permutation(augs)[0]
        channel_mean = x.detach().mean(dim=(0, 2, 3))  # of the whole (input) batch, as upstream
        out = x
        for k, op in enumerate(self.ops):
            sel = choice == k
            # parameters for every image, in strategy order: the stream never depends on choices
            if op == "crop":
                r = torch.randint(2 * self.crop, (n,), generator=g)
                c = torch.randint(2 * self.crop, (n,), generator=g)
                args = (r[sel], c[sel], self.crop, channel_mean)
                fn = _dc_crop
            elif op == "scale":
                u = torch.rand(2, n, generator=g, dtype=torch.float64) * (2 * self.scale) + (1 - self.scale)
                size = (u * h).floor().long().clamp(min=1)  # int(U * H) for both sides (upstream)
                args = (size[0][sel], size[1][sel])
                fn = _dc_scale
            elif op == "rotate":
                angle = torch.randint(-self.rotate, self.rotate, (n,), generator=g)
                args = (angle[sel], channel_mean.mean())
                fn = _dc_rotate
            else:  # noise
                z = torch.randn(int(sel.sum()), ch, h, w, generator=g)
                args = (z, self.noise)
                fn = _dc_noise
            if bool(sel.any()):
                sel_dev = sel.to(x.device)
                out = _scatter(out, sel_dev, fn(x[sel_dev], *args))
        return out


def _dc_crop(x, r, c, crop, fill):
    """Window at offset (r, c) of x padded by `crop` pixels of `fill` (per channel)."""
    n, ch, h, w = x.shape
    dev = x.device
    ys = torch.arange(h, device=dev)[None] + r.to(dev)[:, None] - crop  # (n, h) source rows
    xs = torch.arange(w, device=dev)[None] + c.to(dev)[:, None] - crop
    valid = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    idx = (ys.clamp(0, h - 1)[:, :, None] * w + xs.clamp(0, w - 1)[:, None, :]).reshape(n, 1, -1)
    out = x.flatten(2).gather(2, idx.expand(-1, ch, -1)).reshape_as(x)
    return torch.where(valid[:, None], out, fill.to(x.dtype)[None, :, None, None])


def _nearest_index(dst, in_size, out_size):
    """F.interpolate's "nearest" source index: floor(dst * float32(in / out)), capped."""
    scale = torch.tensor(float(in_size), dtype=torch.float32, device=dst.device) / out_size.float()
    src = (dst.float() * scale[:, None]).floor().long()
    return torch.minimum(src, torch.tensor(in_size - 1, device=dst.device))


def _dc_scale(x, sh, sw):
    """Resize image i to (sh[i], sw[i]) (nearest), paste centred on zeros, crop centred H x W."""
    n, ch, h, w = x.shape
    dev = x.device
    sh, sw = sh.to(dev), sw.to(dev)
    m = torch.maximum(torch.maximum(sh, sw), torch.tensor(max(h, w), device=dev))
    # canvas row of output row y is y + (m-h)//2; the resized image starts at (m-sh)//2
    ys = torch.arange(h, device=dev)[None] + ((m - h) // 2 - (m - sh) // 2)[:, None]
    xs = torch.arange(w, device=dev)[None] + ((m - w) // 2 - (m - sw) // 2)[:, None]
    valid = ((ys >= 0) & (ys < sh[:, None]))[:, :, None] & ((xs >= 0) & (xs < sw[:, None]))[:, None, :]
    sy = _nearest_index(ys.clamp(min=0), h, sh)
    sx = _nearest_index(xs.clamp(min=0), w, sw)
    idx = (sy[:, :, None] * w + sx[:, None, :]).reshape(n, 1, -1)
    out = x.flatten(2).gather(2, idx.expand(-1, ch, -1)).reshape_as(x)
    return torch.where(valid[:, None], out, torch.zeros((), dtype=x.dtype, device=dev))


def _dc_rotate(x, angle, cval):
    """scipy.ndimage.rotate(x, angle, axes=(-2, -1), cval=cval) (reshape=True), centred H x W crop.

    Bilinear, not scipy's cubic spline; outside the image it blends towards cval
    (scipy's mode="grid-constant").
    """
    n, ch, h, w = x.shape
    a = angle.to(torch.float64)
    rad = a * (math.pi / 180)
    exact = torch.remainder(a, 90) == 0  # scipy's cosdg/sindg are exact at multiples of 90
    cos = torch.where(exact, rad.cos().round(), rad.cos())
    sin = torch.where(exact, rad.sin().round(), rad.sin())
    # scipy: rot = [[c, s], [-s, c]] maps output (row, col) to input; out plane = ptp of corners
    rows = cos[:, None] * torch.tensor([0.0, 0, h, h], dtype=torch.float64) \
        + sin[:, None] * torch.tensor([0.0, w, 0, w], dtype=torch.float64)
    cols = -sin[:, None] * torch.tensor([0.0, 0, h, h], dtype=torch.float64) \
        + cos[:, None] * torch.tensor([0.0, w, 0, w], dtype=torch.float64)
    oh = (rows.amax(1) - rows.amin(1) + 0.5).floor()
    ow = (cols.amax(1) - cols.amin(1) + 0.5).floor()
    # output-plane coordinates of the centred crop, relative to the output centre
    ys = torch.arange(h, dtype=torch.float64)[None] + torch.trunc((oh - h) / 2)[:, None] - ((oh - 1) / 2)[:, None]
    xs = torch.arange(w, dtype=torch.float64)[None] + torch.trunc((ow - w) / 2)[:, None] - ((ow - 1) / 2)[:, None]
    in_r = cos[:, None, None] * ys[:, :, None] + sin[:, None, None] * xs[:, None, :] + (h - 1) / 2
    in_c = -sin[:, None, None] * ys[:, :, None] + cos[:, None, None] * xs[:, None, :] + (w - 1) / 2
    grid = torch.stack([in_c / max(w - 1, 1) * 2 - 1, in_r / max(h - 1, 1) * 2 - 1], dim=-1)
    cval = cval.to(x.dtype)
    shifted = F.grid_sample(x - cval, grid.to(x.device, x.dtype), mode="bilinear",
                            padding_mode="zeros", align_corners=True)
    return shifted + cval


def _dc_noise(x, z, noise):
    return x + noise * z.to(x.device, x.dtype)


# --- parsing ---------------------------------------------------------------------------------

def make_augmentation(name: str | None) -> SiameseAugment | DCAugment | None:
    """None / "none" -> None; "dsa:<strategy>" -> SiameseAugment; "dc:<strategy>" -> DCAugment."""
    if name is None or name.strip().lower() == "none":
        return None
    kind, sep, strategy = name.strip().partition(":")
    builders = {"dsa": SiameseAugment, "dc": DCAugment}
    if sep and kind in builders and strategy:
        try:
            return builders[kind](strategy)
        except ValueError as e:
            raise ValueError(f"bad augmentation {name!r}: {e}") from None
    raise ValueError(f"bad augmentation {name!r}: expected 'none', 'dsa:<strategy>' "
                     f"(e.g. 'dsa:{DSA_STRATEGY_NO_FLIP}') or 'dc:<strategy>' (e.g. 'dc:crop_scale_rotate')")
