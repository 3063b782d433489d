"""The OpenCV calls of make_cifar_c.py's spatter, frost and snow, ported exactly to batched tensor ops.

Spatter's water (levels 2-3) runs a chain of OpenCV calls on the 8-bit
liquid layer; each is reproduced with OpenCV's own arithmetic:
- `canny_l1`: cv2.Canny (aperture 3, L2gradient False): 3x3 Sobel with
  replicated borders (`sobel3`), L1 magnitude, OpenCV's fixed-point direction
  tests (TG22 = 13573 in 1.15) and its tie rules for non-maximum suppression,
  then 8-connected hysteresis;
- `chamfer5`: cv2.distanceTransform (DIST_L2, 5x5 mask), OpenCV's two raster
  passes in 16.16 fixed point, each row's in-row recursion as a running
  minimum, then THRESH_TRUNC;
- `box3`: cv2.blur 3x3 (BORDER_REFLECT_101);
- `equalize_hist`: cv2.equalizeHist, with saturate_cast's rounding;
- `corr3`: cv2.filter2D 3x3 (REFLECT_101; the caller saturates to uint8).
Frost scales its photographs with cv2.resize (INTER_LINEAR) at 0.2
(`cv2_linear_downscale`: exact for any 1 / odd scale, where every sample is a
whole pixel), and snow blends with cv2.cvtColor's grey (`rgb_to_gray`).
Checked against OpenCV 4.14 and 5.0 (see `distill_core.data.corruptions`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distill_core.data.ports.filters import pad_border


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """cv2.cvtColor(x, COLOR_RGB2GRAY) of float (n, 3, H, W) -> (n, 1, H, W)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def box3(x: torch.Tensor) -> torch.Tensor:
    """cv2.blur(x, (3, 3)) with BORDER_REFLECT_101 on (n, 1, H, W): row sums, column sums, * 1/9."""
    xp = pad_border(x, 1, "reflect101")
    rows = xp[..., :, :-2] + xp[..., :, 1:-1] + xp[..., :, 2:]
    return (rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]) * (1.0 / 9.0)


def corr3(x: torch.Tensor, kernel, mode: str) -> torch.Tensor:
    """3x3 correlation (OpenCV filter2D semantics) of (n, 1, H, W), as shifted adds."""
    h, w = x.shape[-2:]
    xp = pad_border(x, 1, mode)
    out = None
    for i in range(3):
        for j in range(3):
            k = kernel[i][j]
            if k == 0:
                continue
            term = xp[..., i:i + h, j:j + w]
            term = term if k == 1 else term * k
            out = term if out is None else out + term
    return out


def sobel3(x: torch.Tensor):
    """cv2.Sobel(ksize=3) dx, dy with BORDER_REPLICATE (as Canny uses)."""
    xp = pad_border(x, 1, "nearest")
    d = xp[..., :, 2:] - xp[..., :, :-2]
    dx = d[..., :-2, :] + 2 * d[..., 1:-1, :] + d[..., 2:, :]
    e = xp[..., 2:, :] - xp[..., :-2, :]
    dy = e[..., :, :-2] + 2 * e[..., :, 1:-1] + e[..., :, 2:]
    return dx, dy


def canny_l1(img: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """cv2.Canny(img, low, high) (aperture 3, L1 gradient) on (n, 1, H, W) 0..255 -> bool edges."""
    dx, dy = sobel3(img)
    mag = dx.abs() + dy.abs()
    h, w = mag.shape[-2:]
    mp = F.pad(mag, (1, 1, 1, 1))  # magnitude outside the image is 0

    def nb(di, dj):  # magnitude at (y + di, x + dj)
        return mp[..., 1 + di:1 + di + h, 1 + dj:1 + dj + w]

    ax, ay = dx.abs(), dy.abs()
    # OpenCV's fixed-point tests: |dy| << 15 against |dx| * TG22 (TG22 = 13573)
    horizontal = ay * 32768 < ax * 13573
    vertical = ay * 32768 > ax * (13573 + 65536)
    same_sign = (dx < 0) == (dy < 0)  # OpenCV: s = (xs ^ ys) < 0 ? -1 : 1
    keep_h = (mag > nb(0, -1)) & (mag >= nb(0, 1))
    keep_v = (mag > nb(-1, 0)) & (mag >= nb(1, 0))
    keep_d = torch.where(
        same_sign,
        (mag > nb(-1, -1)) & (mag > nb(1, 1)),
        (mag > nb(-1, 1)) & (mag > nb(1, -1)),
    )
    nms = torch.where(horizontal, keep_h, torch.where(vertical, keep_v, keep_d))
    cand = nms & (mag > math.floor(low))
    edges = cand & (mag > math.floor(high))
    weak = cand & ~edges
    if not bool(weak.any()):
        return edges
    while True:  # 8-connected hysteresis from the strong edges through weak candidates
        ep = F.pad(edges, (1, 1, 1, 1))
        near = ep[..., 0:h, 0:w] | ep[..., 0:h, 1:w + 1] | ep[..., 0:h, 2:w + 2] | ep[..., 1:h + 1, 0:w] \
            | ep[..., 1:h + 1, 2:w + 2] | ep[..., 2:h + 2, 0:w] | ep[..., 2:h + 2, 1:w + 1] | ep[..., 2:h + 2, 2:w + 2]
        grown = edges | (weak & near)
        if torch.equal(grown, edges):
            return edges
        edges = grown


_DIST_SHIFT = 16  # OpenCV distanceTransform works in 16.16 fixed point
_DIST_A, _DIST_B, _DIST_C = (round(v * (1 << _DIST_SHIFT)) for v in (1.0, 1.4, 2.1969))


def _min_all(*ts: torch.Tensor) -> torch.Tensor:
    out = ts[0]
    for t in ts[1:]:
        out = torch.minimum(out, t)
    return out


def chamfer5(zero: torch.Tensor, cap: float) -> torch.Tensor:
    """cv2.distanceTransform(DIST_L2, 5) to the nearest True pixel, then THRESH_TRUNC at `cap`.

    OpenCV's two raster passes (5x5 mask, weights 1 / 1.4 / 2.1969 in 16.16
    fixed point, border rows and columns at DIST_MAX), vectorised over the batch
    and the columns: the in-row dependency d[j] = min(base[j], d[j-1] + a) is a
    running minimum, a*j + cummin(base - a*j). The backward pass runs on the
    mirrored array (its mask is symmetric), so it is the same left-to-right scan.
    """
    a, b, c = _DIST_A, _DIST_B, _DIST_C
    n, _, h, w = zero.shape
    big = (2 ** 31 - 1) >> 2  # OpenCV's DIST_MAX border value
    ramp = torch.arange(w, device=zero.device, dtype=torch.int32) * a
    d = torch.full((n, h + 4, w + 4), big, dtype=torch.int32, device=zero.device)
    init = torch.where(zero[:, 0], 0, big).to(torch.int32)  # (n, h, w)

    def scan(d, rows, step, own):
        """Rows in order; each takes the two rows `step` and 2*`step` back, then a left-to-right scan."""
        for y in rows:
            i = y + 2
            p1, p2 = d[:, i - step], d[:, i - 2 * step]
            base = _min_all(
                own(y, i),
                p2[:, 1:w + 1] + c, p2[:, 3:w + 3] + c,
                p1[:, 0:w] + c, p1[:, 1:w + 1] + b, p1[:, 2:w + 2] + a, p1[:, 3:w + 3] + b, p1[:, 4:w + 4] + c,
            )
            d[:, i, 2:w + 2] = (base - ramp).cummin(-1).values + ramp

    scan(d, range(h), 1, lambda y, i: init[:, y])  # forward: rows above, then the left neighbour
    d = d.flip(-1)  # backward pass on the mirror image: rows below, then the right neighbour
    scan(d, range(h - 1, -1, -1), -1, lambda y, i: d[:, i, 2:w + 2])
    out = d.flip(-1)[:, 2:h + 2, 2:w + 2].unsqueeze(1)
    return (out.float() * (1.0 / (1 << _DIST_SHIFT))).clamp(max=cap)


def equalize_hist(u8: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist per image on (n, 1, H, W) integer-valued floats."""
    n = u8.shape[0]
    flat = u8.reshape(n, -1).long()
    total = flat.shape[1]
    hist = torch.zeros(n, 256, dtype=torch.long, device=u8.device).scatter_add_(1, flat, torch.ones_like(flat))
    first = (hist > 0).float().argmax(dim=1, keepdim=True)
    h_first = hist.gather(1, first)
    csum = hist.cumsum(1) - h_first  # sum of hist[first+1 .. i] for i >= first
    scale = 255.0 / (total - h_first).clamp_min(1).double()
    lut = torch.round(csum.double() * scale).clamp(0, 255)  # saturate_cast rounds to nearest even
    idx = torch.arange(256, device=u8.device)[None]
    lut = torch.where(idx <= first, torch.zeros_like(lut), lut)
    constant = h_first == total
    lut = torch.where(constant, first.double().expand_as(lut), lut)
    return lut.gather(1, flat).view_as(u8).to(u8.dtype)


def cv2_linear_downscale(img: torch.Tensor, factor: float) -> torch.Tensor:
    """cv2.resize(img, (0, 0), fx=factor, fy=factor) (INTER_LINEAR) of uint8 (C, H, W), for odd 1 / factor.

    OpenCV's output side is cvRound(side * factor) and output pixel d samples
    source position (d + 0.5) / factor - 0.5. When 1 / factor is an odd
    integer (5 for 0.2) every position is a whole pixel, the bilinear weights
    are (1, 0) and the result is that pixel: plain subsampling, exact.
    """
    inv = 1.0 / factor
    if inv != round(inv) or round(inv) % 2 != 1:
        raise NotImplementedError(f"frost scale {factor}: only 1 / odd integer is implemented")
    step, h, w = round(inv), img.shape[-2], img.shape[-1]
    oh, ow = round(h * factor), round(w * factor)  # no halves occur: side * factor is a multiple of 1 / step
    rows = torch.arange(oh) * step + step // 2
    cols = torch.arange(ow) * step + step // 2
    return img[..., rows.clamp(max=h - 1), :][..., cols.clamp(max=w - 1)]

