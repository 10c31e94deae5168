"""Dequantizing packed blocks on the CPU (numba; imported only where numba is): the compiled loop of
:mod:`streamkv.kv.storage.dequant_kernel`, which plans and launches it.

One signature (every array of any layout), compiled once and cached on disk, so a new width or a
sliced buffer costs no compilation; the width, the lookup table and the group axis are branches
outside the per-code loops.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

f32 = np.float32


@njit(inline="always")
def _code(c, i, bits, shift, mask):
    """Code ``i`` of a unit's bytes ``c``: at bit ``(i % per) * bits`` of byte ``i // per`` (``shift`` =
    log2 of the codes per byte), or of a 24-bit word of three bytes for ``bits == 3``."""
    if bits == 3:
        w = (i >> 3) * 3
        v = np.int32(c[w]) | (np.int32(c[w + 1]) << 8) | (np.int32(c[w + 2]) << 16)
        return (v >> (3 * (i & 7))) & 7
    return (np.int32(c[i >> shift]) >> ((i & ((1 << shift) - 1)) * bits)) & mask


@njit("void(u1[:,:,:], f4[:,:,:], f4[:,:,:], f4[:], i8, b1, b1, i8, i8, i8[:], f4[:,:,:])", parallel=True, cache=True)
def dequantize(codes, scale, zero, lut, bits, has_lut, channel, unit, group, rows, out):
    """Row ``r`` of the block into ``out[rows[r]]``: each value ``level(code) * scale + zero`` with
    ``level`` the lookup table's entry (``has_lut``) or the code itself. A unit holds ``unit`` tokens:
    per channel (``channel``: one scale per channel for its tokens, codes token-major) or one token of
    ``dim / group`` groups."""
    n_rows, units = codes.shape[0], codes.shape[1]
    d = out.shape[2]
    shift = 0 if bits == 8 else (1 if bits == 4 else (2 if bits == 2 else 3))
    mask = (1 << bits) - 1
    for job in prange(n_rows * units):
        r = job // units
        u = job - r * units
        c, s, z = codes[r, u], scale[r, u], zero[r, u]
        for t in range(unit):
            o = out[rows[r], u * unit + t]
            if channel:
                for ch in range(d):
                    k = _code(c, t * d + ch, bits, shift, mask)
                    o[ch] = (lut[k] if has_lut else f32(k)) * s[ch] + z[ch]
            else:
                for g in range(d // group):
                    sg, zg = s[g], z[g]
                    for ch in range(g * group, (g + 1) * group):
                        k = _code(c, ch, bits, shift, mask)
                        o[ch] = (lut[k] if has_lut else f32(k)) * sg + zg
