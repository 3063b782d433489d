"""skimage.color's rgb2hsv and hsv2rgb ported operation for operation: the reference oracle for brightness and saturate.

make_cifar_c.py's brightness and saturate convert to HSV with skimage, edit V
or S, and convert back. The recipes in `distill_core.data.corruptions` use
closed forms in float32 instead (the same function in exact arithmetic,
within one 8-bit level of the reference); these ports are what they are
checked against. They follow skimage's float operations in the same order:
rgb2hsv's V = max, S = delta / V (0 for greys), hue by the red-, green-,
blue-max cases assigned in that order (later cases win ties), (h / 6) mod 1
and hue 0 for greys; hsv2rgb's sextant i = floor(6h) mod 6, f = 6h - floor(6h)
and per channel one of v, v(1 - s), v(1 - fs), v(1 - (1 - f)s). Fed float64
images (``np.array(img) / 255.``) they give the reference's values exactly,
and so its bytes after ``np.uint8`` (checked against skimage 0.26 and against
the NumPy transcription in the tests); about 5x slower than the closed forms.
kornia's HSV (another hue convention, an epsilon) is not used.
"""

from __future__ import annotations

import torch


def rgb_to_hsv_sk(x: torch.Tensor):
    """skimage.color.rgb2hsv on (n, 3, H, W) -> h, s, v as (n, 1, H, W); hue in [0, 1), 0 for greys."""
    r, g_, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    v = torch.maximum(torch.maximum(r, g_), b)
    delta = v - torch.minimum(torch.minimum(r, g_), b)
    grey = delta == 0
    s = delta / torch.where(grey, 1.0, v)  # delta / v, and 0 for greys (black included)
    d = torch.where(grey, 1.0, delta)
    # skimage assigns red-max, then green-max, then blue-max, so later cases win ties
    h = torch.where(b == v, 4.0 + (r - g_) / d, torch.where(g_ == v, 2.0 + (b - r) / d, (g_ - b) / d))
    h = torch.remainder(h / 6.0, 1.0)
    return torch.where(grey, 0.0, h), s, v


# skimage.color.hsv2rgb picks, per sextant, each channel among v, t, p, q, all of the
# form v * (1 - w * s) with w = 0, 1 - f, 1, f. W_A + W_B * f gives that w exactly.
_SEXTANT = {  # (r, g, b) per sextant: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    "v": (0.0, 0.0), "t": (1.0, -1.0), "p": (1.0, 0.0), "q": (0.0, 1.0),
}
_SEXTANT_CH = ["vtp", "qvp", "pvt", "pqv", "tpv", "vpq"]
_W_A = torch.tensor([[_SEXTANT[c][0] for c in row] for row in _SEXTANT_CH])
_W_B = torch.tensor([[_SEXTANT[c][1] for c in row] for row in _SEXTANT_CH])


def hsv_to_rgb_sk(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """skimage.color.hsv2rgb from (n, 1, H, W) h, s, v -> (n, 3, H, W), same float operations."""
    hi = torch.floor(h * 6)
    f = h * 6 - hi
    idx = torch.remainder(hi, 6).long()  # (n, 1, H, W)
    wa = _W_A.to(device=h.device, dtype=h.dtype)
    wb = _W_B.to(device=h.device, dtype=h.dtype)
    return torch.cat([v * (1 - (wa[:, c][idx] + wb[:, c][idx] * f) * s) for c in range(3)], dim=1)
