"""scipy.ndimage.gaussian_filter and the border conventions the ports share, on (..., H, W) tensors.

Borders are named as scipy names them where it has the mode: ``nearest``
(edge, aaa|abcd, OpenCV's BORDER_REPLICATE), ``symmetric`` (scipy's
``reflect``, dcba|abcd) and ``reflect101`` (OpenCV's default
BORDER_REFLECT_101, dcb|abcd).

`gaussian_filter` is scipy's: a separable correlation with the normalised
taps exp(-x^2 / 2 sigma^2) for x in -r..r, r = int(truncate * sigma + 0.5),
borders folded into the (n, n) matrix of each 1-D pass, so a pass is one
small matrix product. skimage's ``gaussian`` is this function, and both of
make_cifar_c.py's gaussian blurs come down to it: spatter's (truncate 4,
mode 'nearest') and elastic's (truncate 3, mode 'reflect' = ``symmetric``).
Values agree with scipy's to float rounding (summation order), checked to
1e-12 in float64.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def pad_index(n: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    """Source index for every padded position: 'nearest' (edge), 'symmetric'
    (scipy 'reflect', dcba|abcd), 'reflect101' (OpenCV default, dcb|abcd)."""
    i = torch.arange(-before, n + after, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if mode == "symmetric":
        m = i % (2 * n)
        return torch.where(m < n, m, 2 * n - 1 - m)
    if mode == "reflect101":
        if n == 1:
            return torch.zeros_like(i)
        m = i % (2 * n - 2)
        return torch.where(m < n, m, 2 * n - 2 - m)
    raise ValueError(mode)


def pad_border(x: torch.Tensor, p: int, mode: str) -> torch.Tensor:
    """`p` pixels on every side of the last two dims, 'nearest' or 'reflect101'."""
    torch_mode = {"nearest": "replicate", "reflect101": "reflect"}[mode]
    return F.pad(x, (p, p, p, p), mode=torch_mode)


@functools.lru_cache(maxsize=256)
def _filter_matrix(n: int, taps: tuple, mode: str, device: str, dtype: torch.dtype) -> torch.Tensor:
    """(n, n) matrix of a centred 1-D correlation with `taps`, borders folded in."""
    r = len(taps) // 2
    src = pad_index(n, r, r, mode, "cpu")
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for t, wt in enumerate(taps):
            m[i, src[i + t]] += wt
    return m.to(device=device, dtype=dtype)


def separable(x: torch.Tensor, taps: tuple, mode: str) -> torch.Tensor:
    """Same 1-D filter along H and W of (n, c, H, W), as two small matrix products."""
    h, w = x.shape[-2:]
    mw = _filter_matrix(w, taps, mode, str(x.device), x.dtype)
    mh = _filter_matrix(h, taps, mode, str(x.device), x.dtype)
    y = (x @ mw.T).transpose(-1, -2)  # (..., W, H)
    return (y @ mh.T).transpose(-1, -2)


def gaussian_filter(x: torch.Tensor, sigma: float, truncate: float, mode: str) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter over the last two dims (mode 'nearest' or 'symmetric')."""
    r = int(truncate * sigma + 0.5)
    if r == 0 or sigma == 0:
        return x
    t = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-r, r + 1)]
    total = sum(t)
    return separable(x, tuple(v / total for v in t), mode)
