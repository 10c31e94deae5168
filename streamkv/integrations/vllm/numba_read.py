"""The compiled read (numba), imported by ``kernel.py`` on the first read only (never at import time:
vLLM 0.32's CPU worker dies at start if numba is loaded; see ``kernel.py``).

:func:`reader` compiles one read per slot layout, its head dim and group sizes constants (the short
per-group loops then unroll: 1.4x faster than with the sizes as arguments), on first use, kept on disk
across processes like the engine's decode kernels (:mod:`streamkv.kv.kernels.disk_cache`).
"""

from functools import lru_cache

import numba
import numpy as np

from ...kv.kernels.disk_cache import on_disk, tagged
from . import numba_formats
from .numba_formats import half, narrow

jit = numba.njit(inline="always", cache=True)


@jit
def unpack_bytes(slot, off, codes, bits):  # 1, 2, 4 or 8-bit codes: byte by byte, low bits first
    per, mask = 8 // bits, (1 << bits) - 1
    for j in range(codes.shape[0] // per):
        w = slot[off + j]
        for k in range(per):
            codes[j * per + k] = (w >> (k * bits)) & mask


@jit
def unpack3(slot, off, codes):  # 3 bits: bit 3i of the little-endian stream
    for i in range(codes.shape[0]):
        b = off + ((3 * i) >> 3)
        w = np.int32(slot[b]) | (np.int32(slot[b + 1]) << 8 if ((3 * i) & 7) > 5 else 0)
        codes[i] = (w >> ((3 * i) & 7)) & 7


@jit
def codes_of(slot, off, bits, codes):  # one token's codes (keys or values) of one head, as numbers
    if bits == 4:  # a constant width per branch
        unpack_bytes(slot, off, codes, 4)
    elif bits == 8:
        unpack_bytes(slot, off, codes, 8)
    elif bits == 2:
        unpack_bytes(slot, off, codes, 2)
    else:
        unpack3(slot, off, codes)


@jit
def part(slot, off, bits, group, ncodes, codes, buf):  # one token's keys (or values) of one head, float32
    codes_of(slot, off, bits, codes)  # first the codes ...
    for gi in range(buf.shape[0] // group):  # ... then each group's scale and zero: stride-1, vectorizes
        m = off + ncodes + 4 * gi
        scale, zero = half(slot[m] | (np.int32(slot[m + 1]) << 8)), half(slot[m + 2] | (np.int32(slot[m + 3]) << 8))
        for i in range(gi * group, (gi + 1) * group):
            buf[i] = codes[i] * scale + zero


@jit
def store_bf16(buf, rounded, region, offsets):  # round to nearest even (vectorized), then place
    narrow(buf, rounded)
    for i in range(buf.shape[0]):  # at vLLM's layout offsets
        region[offsets[i]] = rounded[i]


@jit
def job(cache, pages, out, k_offsets, v_offsets, j, kbits, kgroup, kcodes, vbits, vgroup, vcodes, kbytes, dim):
    """Page ``j // heads``, head ``j % heads``: every slot of it into ``out[j]``."""
    heads, block = cache.shape[1], cache.shape[2]
    p, h = j // heads, j % heads
    buf, codes = np.empty(dim, np.float32), np.empty(dim, np.float32)
    rounded = np.empty(dim, np.uint16)
    region = out[j]  # (block * 2 * dim,)
    for t in range(block):
        slot = cache[pages[p], h, t]
        part(slot, 0, kbits, kgroup, kcodes, codes, buf)
        store_bf16(buf, rounded, region, k_offsets[t])
        part(slot, kbytes, vbits, vgroup, vcodes, codes, buf)
        store_bf16(buf, rounded, region, v_offsets[t])


@lru_cache(maxsize=None)
def reader(dim: int, key_group: int, value_group: int):
    """The compiled read for a slot layout: ``read(cache, pages, out, k_offsets, v_offsets, kbits, kgroup,
    kcodes, vbits, vgroup, vcodes, kbytes)`` with ``dim``, ``key_group`` and ``value_group`` fixed."""

    @numba.njit(parallel=True)
    def read(cache, pages, out, k_offsets, v_offsets, kbits, kgroup, kcodes, vbits, vgroup, vcodes, kbytes):
        for j in numba.prange(pages.shape[0] * cache.shape[1]):
            job(cache, pages, out, k_offsets, v_offsets, j, kbits, key_group, kcodes, vbits, value_group, vcodes,
                kbytes, dim)

    layout = (dim, key_group, value_group)
    tagged("_".join(map(str, layout)), read)  # one symbol name per layout (see disk_cache)
    return on_disk(read, ("vllm-read", *layout), (__file__, numba_formats.__file__))
