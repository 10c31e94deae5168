"""The compiled store (numba), imported by ``kernel.py`` on the first store only (never at import time:
vLLM 0.32's CPU worker dies at start if numba is loaded; see ``kernel.py``).

Why: as torch ops, storing a decode step's few tokens is a rotation, a min/max, a division, a round, a
pack and a scatter per layer, each an op with its own overhead, and that cost more than the attention.
Here one job per (token, KV head) widens its key and value (bf16 bits or float32), rotates them by the
Hadamard matrix, quantizes each group min-max and writes the packed codes and fp16 (scale, zero)
straight into its slot: the format of ``codec.SlotCodec.encode`` (same arithmetic, fp16 rounded to
nearest even; only the rotation's float32 summation order differs from torch's matmul).
"""

import numba
import numpy as np

from .numba_formats import ROUND, half, half_bits, widen

jit = numba.njit(inline="always", cache=True)


@jit
def put(dst, off, v, bits, group, levels, min_scale, codes):
    """``v`` (float32, rotated) quantized min-max per group and packed at ``dst[off:]``: codes, then an fp16
    (scale, zero) per group."""
    dim = v.shape[0]
    ncodes = dim * bits // 8
    for gi in range(dim // group):
        lo, hi = v[gi * group], v[gi * group]
        for i in range(gi * group, (gi + 1) * group):
            lo, hi = min(lo, v[i]), max(hi, v[i])
        sb, zb = half_bits(max((hi - lo) / np.float32(levels), min_scale)), half_bits(lo)
        m = off + ncodes + 4 * gi
        dst[m], dst[m + 1], dst[m + 2], dst[m + 3] = sb & 255, sb >> 8, zb & 255, zb >> 8
        scale, zero = half(sb), half(zb)
        for i in range(gi * group, (gi + 1) * group):
            c = ((v[i] - zero) / scale + ROUND) - ROUND
            codes[i] = np.int32(min(max(c, np.float32(0)), np.float32(levels)))
    for j in range(ncodes):
        dst[off + j] = 0
    for i in range(dim):  # little-endian bit stream: code i at bit bits * i
        b, o = (bits * i) >> 3, (bits * i) & 7
        dst[off + b] |= (codes[i] << o) & 255
        if o + bits > 8:
            dst[off + b + 1] |= codes[i] >> (8 - o)


@jit
def rotate(x, h, v):  # v = x H
    v[:] = 0
    for a in range(x.shape[0]):
        for c in range(x.shape[0]):
            v[c] += x[a] * h[a, c]


@numba.njit(parallel=True, cache=True)
def store(cache, geo, slots, key, value, h, kbits, kgroup, vbits, vgroup, kbytes, min_scale):
    """Token ``i`` of ``key``/``value`` ``(tokens, heads, dim)`` into slot ``slots[i]`` of the 32-bit word array
    ``cache`` (its geometry in ``geo``: see ``kernel._flat``; word-major pages, see ``codec.py``);
    ``min_scale``: the engine's floor on a group's step."""
    heads, dim, block, sw = key.shape[1], key.shape[2], geo[2], geo[3]
    for j in numba.prange(slots.shape[0] * heads):
        i, hd = j // heads, j % heads
        x, v, codes = np.empty(dim, np.float32), np.zeros(dim, np.float32), np.empty(dim, np.int32)
        words = np.empty(sw, np.uint32)  # the slot, packed byte by byte, then stored word by word
        slot = words.view(np.uint8)
        widen(key[i, hd], x)
        rotate(x, h, v)
        put(slot, 0, v, kbits, kgroup, (1 << kbits) - 1, np.float32(min_scale), codes)
        widen(value[i, hd], x)
        rotate(x, h, v)
        put(slot, kbytes, v, vbits, vgroup, (1 << vbits) - 1, np.float32(min_scale), codes)
        at = (slots[i] // block) * geo[0] + hd * geo[1] + slots[i] % block  # word 0 of the token
        for w in range(sw):  # word w of the token: one page row further each
            cache[at + w * block] = words[w]
