"""libjpeg-turbo's baseline JPEG round trip (PIL's ``save(..., "JPEG", quality=q)`` + decode), as batched tensor ops.

`jpeg_roundtrip` runs the codec libjpeg-turbo runs for PIL's defaults, step
for step in exact integer arithmetic (integers held in float64, which is
exact at these magnitudes):
- encoder: RGB -> YCbCr in 16-bit fixed point (jccolor.c), h2v2 (4:2:0)
  downsampling with its alternating 1, 2 bias (jcsample.c), edge replication
  to whole blocks and iMCU rows as the encoder pads, the ISLOW integer DCT
  (jfdctint.c), the standard tables scaled by jpeg_set_quality(q,
  force_baseline), and libjpeg-turbo's reciprocal quantiser
  (compute_reciprocal: ((|x| + corr) * recip) >> shift);
- decoder: dequantisation, the ISLOW IDCT (jidctint.c) with its
  range-limit table (wrapping beyond -512..511 as range_limit[x & 1023]
  does), h2v2 fancy upsampling (jdsample.c) and YCbCr -> RGB in fixed point
  (jdcolor.c).
Checked byte-identical to libjpeg-turbo (torchvision's encode_jpeg /
decode_jpeg, which are byte-identical to PIL) at qualities 10-95 on 28x28,
32x32 and odd sizes. kornia's differentiable JPEG is an approximation and is
not used.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_STD_LUMA = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]
_STD_CHROMA = [
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
] + [99] * 32
_CONST_BITS, _PASS1_BITS = 13, 2
_F0298, _F0390, _F0541, _F0765 = 2446, 3196, 4433, 6270
_F0899, _F1175, _F1501, _F1847 = 7373, 9633, 12299, 15137
_F1961, _F2053, _F2562, _F3072 = 16069, 16819, 20995, 25172


def _jpeg_quant_table(base, quality: int) -> list:
    """jpeg_set_quality(quality, force_baseline=TRUE) scaling of a standard table."""
    quality = min(max(quality, 1), 100)
    scale = 5000 // quality if quality < 50 else 200 - quality * 2
    return [min(max((b * scale + 50) // 100, 1), 255) for b in base]


def _jpeg_reciprocal(divisor: int):
    """libjpeg-turbo's compute_reciprocal: quantise as ((|x| + corr) * recip) >> shift."""
    if divisor == 1:
        return 1, 0, 0
    r = 16 + divisor.bit_length() - 1
    fq, fr = divmod(1 << r, divisor)
    c = divisor // 2
    if fr == 0:
        fq >>= 1
        r -= 1
    elif fr <= divisor // 2:
        c += 1
    else:
        fq += 1
    return fq, c, r


def _fdct_butterfly(v, first):
    """jfdctint.c (ISLOW) on 8 linear forms; returns pre-descale outputs and their shifts."""
    tmp0, tmp7 = v[0] + v[7], v[0] - v[7]
    tmp1, tmp6 = v[1] + v[6], v[1] - v[6]
    tmp2, tmp5 = v[2] + v[5], v[2] - v[5]
    tmp3, tmp4 = v[3] + v[4], v[3] - v[4]
    tmp10, tmp13 = tmp0 + tmp3, tmp0 - tmp3
    tmp11, tmp12 = tmp1 + tmp2, tmp1 - tmp2
    out = [None] * 8
    if first:  # LEFT_SHIFT(.., PASS1_BITS): exact, no descale
        out[0], out[4] = (tmp10 + tmp11) * (1 << _PASS1_BITS), (tmp10 - tmp11) * (1 << _PASS1_BITS)
        even_shift, sh = 0, _CONST_BITS - _PASS1_BITS
    else:
        out[0], out[4] = tmp10 + tmp11, tmp10 - tmp11
        even_shift, sh = _PASS1_BITS, _CONST_BITS + _PASS1_BITS
    z1 = (tmp12 + tmp13) * _F0541
    out[2] = z1 + tmp13 * _F0765
    out[6] = z1 - tmp12 * _F1847
    z1, z2, z3, z4 = tmp4 + tmp7, tmp5 + tmp6, tmp4 + tmp6, tmp5 + tmp7
    z5 = (z3 + z4) * _F1175
    z1, z2 = z1 * -_F0899, z2 * -_F2562
    z3, z4 = z3 * -_F1961 + z5, z4 * -_F0390 + z5
    out[7] = tmp4 * _F0298 + z1 + z3
    out[5] = tmp5 * _F2053 + z2 + z4
    out[3] = tmp6 * _F3072 + z2 + z3
    out[1] = tmp7 * _F1501 + z1 + z4
    return out, [even_shift, sh, sh, sh, even_shift, sh, sh, sh]


def _idct_butterfly(c, first):
    """jidctint.c (ISLOW) on 8 linear forms; returns pre-descale outputs and their shifts."""
    z1 = (c[2] + c[6]) * _F0541
    tmp2 = z1 - c[6] * _F1847
    tmp3 = z1 + c[2] * _F0765
    tmp0 = (c[0] + c[4]) * (1 << _CONST_BITS)
    tmp1 = (c[0] - c[4]) * (1 << _CONST_BITS)
    tmp10, tmp13, tmp11, tmp12 = tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2
    t0, t1, t2, t3 = c[7], c[5], c[3], c[1]
    z1, z2, z3, z4 = t0 + t3, t1 + t2, t0 + t2, t1 + t3
    z5 = (z3 + z4) * _F1175
    z1, z2 = z1 * -_F0899, z2 * -_F2562
    z3, z4 = z3 * -_F1961 + z5, z4 * -_F0390 + z5
    t0 = t0 * _F0298 + z1 + z3
    t1 = t1 * _F2053 + z2 + z4
    t2 = t2 * _F3072 + z2 + z3
    t3 = t3 * _F1501 + z1 + z4
    out = [tmp10 + t3, tmp11 + t2, tmp12 + t1, tmp13 + t0, tmp13 - t0, tmp12 - t1, tmp11 - t2, tmp10 - t3]
    sh = _CONST_BITS - _PASS1_BITS if first else _CONST_BITS + _PASS1_BITS + 3
    return out, [sh] * 8


@functools.lru_cache(maxsize=16)
def _dct_pass(kind: str, first: bool, size: int, device: str):
    """Block-diagonal (size x size) float64 matrix of one 1-D pass, its rounding offsets and scales."""
    eye = [torch.eye(8, dtype=torch.int64)[j] for j in range(8)]  # v[j] = e_j: outputs give the columns
    outs, shifts = (_fdct_butterfly if kind == "f" else _idct_butterfly)(eye, first)
    m = torch.stack(outs).to(torch.float64)  # (8 outputs, 8 inputs)
    big = torch.block_diag(*[m] * (size // 8))
    sh = torch.tensor(shifts * (size // 8), dtype=torch.float64)
    offset = torch.where(sh > 0, 2.0 ** (sh - 1), 0.0)
    return big.to(device), offset.to(device), (2.0 ** -sh).to(device)


def _descaled(y, offset, scale):
    return torch.floor((y + offset) * scale)


def _rows(x, kind, first):  # along the last dim
    m, off, sc = _dct_pass(kind, first, x.shape[-1], str(x.device))
    return _descaled(x @ m.T, off, sc)


def _cols(x, kind, first):  # along the second-to-last dim
    m, off, sc = _dct_pass(kind, first, x.shape[-2], str(x.device))
    return _descaled((x.transpose(-1, -2) @ m.T).transpose(-1, -2), off[:, None], sc[:, None])


@functools.lru_cache(maxsize=32)
def _jpeg_tables(quality: int, h: int, w: int, device: str):
    """Per-position quantiser tables tiled over an (h, w) plane: q, recip, corr, 2^-shift (float64)."""
    out = {}
    for name, base in (("luma", _STD_LUMA), ("chroma", _STD_CHROMA)):
        q = _jpeg_quant_table(base, quality)
        rec = [_jpeg_reciprocal(v * 8) for v in q]  # ISLOW output is scaled up by 8

        hh, ww = (h, w) if name == "luma" else (h // 2, w // 2)
        out[name] = tuple(
            torch.tensor(v, dtype=torch.float64).view(8, 8).repeat(hh // 8, ww // 8).to(device)
            for v in (q, [r[0] for r in rec], [r[1] for r in rec], [2.0 ** -r[2] for r in rec])
        )
    return out


def _codec_plane(p, tabs):
    """FDCT, quantise, dequantise, IDCT, range-limit of level-shifted planes (..., H, W), float64."""
    q, recip, corr, inv_shift = tabs
    coef = _cols(_rows(p - 128, "f", True), "f", False)
    qc = torch.floor((coef.abs() + corr) * recip * inv_shift) * torch.sign(coef)
    out = _rows(_cols(qc * q, "i", True), "i", False)
    # range_limit[x & 1023] (centred on 0): x+128 clipped to 0..255 within -512..511, wrapping beyond
    idx = torch.remainder(out, 1024)
    return torch.where(idx < 128, idx + 128, torch.where(idx < 512, 255.0, torch.where(idx < 896, 0.0, idx - 896)))


def _fancy_upsample(c):
    """jdsample.c h2v2_fancy_upsample of (..., ch, cw) chroma with edge context -> (..., 2ch, 2cw)."""
    ch, cw = c.shape[-2:]
    lead = c.shape[:-2]
    p = F.pad(c.reshape(-1, 1, ch, cw), (1, 1, 1, 1), mode="replicate")[:, 0]
    mid = p[:, 1:ch + 1, :]
    rows = torch.stack([mid * 3 + p[:, 0:ch, :], mid * 3 + p[:, 2:ch + 2, :]], 2).reshape(-1, 2 * ch, cw + 2)
    this, last, nxt = rows[..., 1:cw + 1], rows[..., 0:cw], rows[..., 2:cw + 2]
    even = torch.floor((this * 3 + last + 8) * (1 / 16))
    odd = torch.floor((this * 3 + nxt + 7) * (1 / 16))
    return torch.stack([even, odd], -1).reshape(*lead, 2 * ch, 2 * cw)


def jpeg_roundtrip(u8: torch.Tensor, quality: int) -> torch.Tensor:
    """libjpeg-turbo baseline encode (4:2:0, ISLOW, quality) + decode (ISLOW, fancy upsampling), batched."""
    n, _, h, w = u8.shape
    hp, wp = -(-h // 16) * 16, -(-w // 16) * 16  # whole MCUs
    # the encoder replicates the last column up to whole blocks before downsampling, but the
    # last row only up to an even height (one row group); the downsampled planes are then
    # extended to whole iMCU rows by repeating their own last row
    he = h + h % 2
    x = F.pad(u8.to(torch.float64), (0, wp - w, 0, he - h), mode="replicate")
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    fix = lambda v: float(int(v * 65536 + 0.5))  # noqa: E731  (jccolor.c / jdcolor.c FIX)
    half, off = 32768.0, 128.0 * 65536 + 32768.0 - 1
    sc = 1 / 65536
    y = torch.floor((fix(0.299) * r + fix(0.587) * g + fix(0.114) * b + half) * sc)
    cb = torch.floor((-fix(0.16874) * r - fix(0.33126) * g + fix(0.5) * b + off) * sc)
    cr = torch.floor((fix(0.5) * r - fix(0.41869) * g - fix(0.08131) * b + off) * sc)
    c = torch.stack([cb, cr], 1)  # (n, 2, he, wp)
    # h2v2_downsample: (sum of 2x2 + bias) >> 2, bias 1, 2, 1, 2, ... along the row
    s4 = c[..., 0::2, 0::2] + c[..., 0::2, 1::2] + c[..., 1::2, 0::2] + c[..., 1::2, 1::2]
    bias = torch.tensor([1.0, 2.0], dtype=torch.float64, device=u8.device).repeat(wp // 4)
    c = torch.floor((s4 + bias) * 0.25)
    y = F.pad(y[:, None], (0, 0, 0, hp - he), mode="replicate")[:, 0]
    c = F.pad(c, (0, 0, 0, (hp - he) // 2), mode="replicate")
    tabs = _jpeg_tables(quality, hp, wp, str(u8.device))
    y = _codec_plane(y, tabs["luma"])[:, :h, :w]
    ch, cw = -(-h // 2), -(-w // 2)  # the decoder's downsampled size: context beyond it is replicated
    c = _fancy_upsample(_codec_plane(c, tabs["chroma"])[..., :ch, :cw])[..., :h, :w] - 128
    cb, cr = c[:, 0], c[:, 1]
    red = y + torch.floor((fix(1.402) * cr + half) * sc)
    green = y + torch.floor((-fix(0.71414) * cr - fix(0.34414) * cb + half) * sc)
    blue = y + torch.floor((fix(1.772) * cb + half) * sc)
    return torch.stack([red, green, blue], 1).clamp(0, 255)
