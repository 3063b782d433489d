"""Pillow's BOX resize of 8-bit images (``Image.resize(size, Image.BOX)``), exactly, as batched tensor ops.

Pillow resamples in two separable 8-bit passes, horizontal then vertical
(each skipped when that side is unchanged), with the coefficients of its
precompute_coeffs: for output pixel x the window of inputs whose centres
fall within +-support of (x + 0.5) * scale, every BOX weight normalised and
held in 22-bit fixed point, each pass rounding as clip8((sum * k + 2^21) >> 22).
BOX weights are uniform within a window, so a pass is the window sums (one
matrix product, exact for 8-bit values) times the window's one weight.
Checked byte-identical to PIL (make_cifar_c.py's pixelate, downscale and
upscale).
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=64)
def _box_coeffs(in_size: int, out_size: int):
    """Pillow's precompute_coeffs for the BOX filter -> (0/1 window matrix (out, in), fixed-point weight per output).

    BOX weights are uniform within each output's window, so Pillow's 22-bit
    sum(px * k) equals k * (window sum), computed exactly from the integer sum.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    window = torch.zeros(out_size, in_size)
    kint = torch.zeros(out_size, dtype=torch.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        inside = [xi for xi in range(xmin, xmax) if -0.5 < (xi - center + 0.5) / filterscale <= 0.5]
        window[xx, inside] = 1.0
        kint[xx] = math.floor(0.5 + (1 << 22) / len(inside))
    return window, kint


def _resample_pass(x: torch.Tensor, in_size: int, out_size: int, dim: int) -> torch.Tensor:
    """One Pillow 8-bit BOX pass along `dim` (-1 or -2): clip8((sum * k + 2^21) >> 22)."""
    window, kint = _box_coeffs(in_size, out_size)
    counts = window.sum(1)
    if bool((counts == 1).all()):  # upscaling: every output copies one input pixel
        return x.index_select(dim, window.argmax(1).to(x.device))
    window = window.to(x.device)
    # window sums of 8-bit values are exact in float32
    sums = x @ window.T if dim == -1 else (x.transpose(-1, -2) @ window.T).transpose(-1, -2)
    shape = (-1,) if dim == -1 else (-1, 1)
    if bool((kint == (1 << 22) / counts).all()):  # windows of 1, 2, 4, ... pixels: k is exact in float32
        return torch.floor(sums * (kint / (1 << 22)).float().to(x.device).view(shape) + 0.5)
    k = kint.to(x.device).view(shape)
    return torch.floor((sums.double() * k + (1 << 21)) / (1 << 22)).clamp(0, 255).float()


def pil_box_resize(u8: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """PIL `Image.resize((out_w, out_h), Image.BOX)` of 8-bit images: horizontal pass, then vertical."""
    h, w = u8.shape[-2:]
    out = u8.float()
    if out_w != w:
        out = _resample_pass(out, w, out_w, -1)
    if out_h != h:
        out = _resample_pass(out, h, out_h, -2)
    return out.float()

