"""Number formats in the compiled kernels (numba has neither bfloat16 nor float16 arithmetic): bf16 and
fp16 read and written through their bits. Imported by the ``numba_*`` kernels only (see ``kernel.py``
for why numba is loaded late)."""

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

jit = numba.njit(inline="always", cache=True)
POW2 = np.array([2.0 ** (e - 25) for e in range(32)], np.float32)  # fp16 exponent e -> 2**(e - 25)
ROUND = np.float32(2.0**23)  # x + 2**23 - 2**23 rounds 0 <= x < 2**23 to nearest even (not under fastmath)
HALF_SCALE = np.float32(2.0**112)  # see half_scaled_bits: fp16's exponent bias 15 against float32's 127


def widen(src, dst):
    """``dst[:] = src`` as float32; ``src`` is float32 or bf16 bits (uint16). Compiled code only."""
    raise NotImplementedError


def narrow(src, dst):
    """``dst[:] = src`` (float32); ``dst`` is float32 or bf16 bits (uint16, rounded to nearest even)."""
    raise NotImplementedError


@overload(widen, inline="always")
def _widen(src, dst):
    if src.dtype == types.uint16:
        def bf16(src, dst):  # bf16 is a float32's high half
            bits = dst.view(np.uint32)
            for i in range(dst.shape[0]):
                bits[i] = np.uint32(src[i]) << np.uint32(16)
        return bf16

    def same(src, dst):
        for i in range(dst.shape[0]):
            dst[i] = src[i]
    return same


@overload(narrow, inline="always")
def _narrow(src, dst):
    if dst.dtype == types.uint16:
        def bf16(src, dst):
            bits = src.view(np.uint32)
            for i in range(src.shape[0]):
                u = bits[i]
                dst[i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
        return bf16

    def same(src, dst):
        for i in range(src.shape[0]):
            dst[i] = src[i]
    return same


@jit
def half(h):
    """The float32 of fp16 bits ``h`` (no libm call)."""
    h = np.int32(h)
    e, m = (h >> 10) & 0x1F, h & 0x3FF
    v = np.float32(m if e == 0 else 1024 + m) * POW2[max(e, 1)] if e != 31 else np.float32(np.inf)
    return -v if h & 0x8000 else v


@jit
def half_scaled_bits(h):
    """The bits (uint32) of a float32 that, times ``HALF_SCALE``, is the finite fp16 with bits ``h`` (the
    low 16 of a uint32): no branch, so a loop of them vectorizes (:func:`half` takes one at a time)."""
    return ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))


@jit
def half_bits(f):
    """The fp16 bits of float32 ``f``, rounded to nearest even as torch's ``.half()``; beyond fp16's range:
    inf."""
    a = abs(f)
    sign = 0x8000 if f < 0 else 0
    if a >= np.float32(65520.0):
        return sign | 0x7C00
    if a < np.float32(2.0**-14):  # subnormal: a multiple of 2**-24, exactly
        return sign | int((a * np.float32(2.0**24) + ROUND) - ROUND)
    e = math.frexp(np.float64(a))[1]  # 2**(e - 1) <= a < 2**e
    q = a * np.float32(2.0 ** (11 - e))  # exact: 1024 <= q < 2048
    q = (q + ROUND) - ROUND  # 11 significant bits, to nearest even (2048 carries into the exponent)
    return sign | (((e + 14) << 10) + int(q) - 1024)
