"""ImageMagick's MotionBlurImage (what Wand's ``motion_blur`` calls in make_cifar_c.py's snow), exactly.

Reimplemented as ImageMagick 6's C code defines it: a one-sided
half-Gaussian of width 2 * ceil(radius) + 1 taps (weights
exp(-i^2 / 2 sigma^2), normalised), tap i sampling the pixel at offset
(ceil(i cos a - 0.5), ceil(i sin a - 0.5)) with edge-clamped borders, then
the Q16 quantum rounding and the 8-bit PNG export that the reference's PNG
round trip performs (floor(round(v * 257) / 257)). Byte-identical to Wand +
ImageMagick 6.9.11-Q16 (see `distill_core.data.corruptions`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def motion_blur_im(layer: torch.Tensor, radius: float, sigma: float, angle_deg: torch.Tensor) -> torch.Tensor:
    """ImageMagick MotionBlurImage on (n, 1, H, W) 0..255 values, one angle per image.

    Output pixel p is sum_i k_i * layer[clamp(p + offset_i)]: one gather per tap.
    """
    n, _, h, w = layer.shape
    width = int(2 * math.ceil(radius) + 1)
    dev = layer.device
    i = torch.arange(width, dtype=torch.float64, device=dev)
    k = torch.exp(-(i * i) / (2.0 * sigma * sigma))
    k = k / k.sum()
    rad = angle_deg.to(torch.float64)[:, None] * (math.pi / 180.0)
    ox = torch.ceil(i[None] * torch.cos(rad) - 0.5).long()  # column offset per tap, (n, width)
    oy = torch.ceil(i[None] * torch.sin(rad) - 0.5).long()  # row offset per tap
    # edge-padded copy (only as far as the offsets reach): every tap is a plain offset into it
    top, bottom = max(-int(oy.min()), 0), max(int(oy.max()), 0)
    left, right = max(-int(ox.min()), 0), max(int(ox.max()), 0)
    pw = w + left + right
    padded = F.pad(layer.float(), (left, right, top, bottom), mode="replicate")
    flat = padded.reshape(-1)
    ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    base = (torch.arange(n, device=dev)[:, None] * padded[0, 0].numel()
            + ((ys + top) * pw + xs + left).reshape(1, h * w)).to(torch.int32)
    off = (oy * pw + ox).to(torch.int32)  # (n, width)
    out = torch.zeros(n, h * w, device=dev)
    for t, kt in enumerate(k.tolist()):  # int32 indices: half the index traffic of gather
        out.add_(flat.index_select(0, (base + off[:, t:t + 1]).view(-1)).view(n, h * w), alpha=kt)
    # Q16 quantum (rounded), then the 8-bit PNG export truncates: floor(round(v * 257) / 257)
    out = torch.floor(torch.floor(out * 257 + 0.5) / 257)
    return out.clamp(0, 255).to(layer.dtype).view(n, 1, h, w)
