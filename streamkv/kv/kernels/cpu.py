"""CPU decode kernels that read the packed codes directly (numba; compiled once, cached on disk).

``scores`` computes ``q · k_t`` for every stored key of a block and ``values`` accumulates
``Σ_t p_t v_t``, both from the packed bytes, with the scale folded into the query (per-channel keys:
``q·(s∘c + z) = (q∘s)·c + q·z``) or into the probabilities (per-token values), so no dense copy of
the history is written. They serve :class:`~streamkv.kv.attention.fused.FusedBackend` in decoding,
where reading the history dominates; chunked prefill, which is matmul-bound, stays on BLAS.

Without numba (or on a layout these kernels do not cover) the backend uses its tensor path: the
numbers are the same, only slower, and :func:`available` says so once.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

log = logging.getLogger(__name__)

try:  # numba is optional: a missing compiler means the eager path, never an error
    import numba
    from numba import njit, prange
except Exception as e:  # noqa: BLE001
    numba, _why = None, f"{type(e).__name__}: {e}"
else:
    _why = ""

_warned = False
CHUNKS = 8  # token chunks per row, so that rows x chunks spread over the cores


def available() -> bool:
    """Whether the compiled kernels can run here (warns once, in one line, when they cannot)."""
    global _warned
    if numba is None and not _warned:
        log.warning("streamkv: numba unavailable (%s); the fused CPU backend uses its slower tensor path", _why)
        _warned = True
    return numba is not None and os.environ.get("STREAMKV_NO_KERNELS") != "1"


def covers(block) -> bool:
    """Whether these kernels read ``block`` (packed widths 2/3/4/8, head dim a multiple of 8)."""
    return block.bits in (2, 3, 4, 8) and block.dim % 8 == 0


if numba is not None:

    @njit(inline="always", fastmath=True)
    def _unpack(codes, base, dim, bits, lut, has_lut, buf):
        """Codes ``base .. base + dim`` of one packed unit into ``buf`` as floats (the LUT's levels if any)."""
        if bits == 8:
            for c in range(dim):
                buf[c] = codes[base + c]
        elif bits == 4:
            o = base >> 1
            for i in range(dim >> 1):
                b = codes[o + i]
                buf[2 * i] = b & 15
                buf[2 * i + 1] = b >> 4
        elif bits == 2:
            o = base >> 2
            for i in range(dim >> 2):
                b = codes[o + i]
                buf[4 * i] = b & 3
                buf[4 * i + 1] = (b >> 2) & 3
                buf[4 * i + 2] = (b >> 4) & 3
                buf[4 * i + 3] = b >> 6
        else:  # 3 bits: eight codes per little-endian 24-bit word
            o = (base >> 3) * 3
            for w in range(dim >> 3):
                word = np.int32(codes[o + 3 * w]) | (np.int32(codes[o + 3 * w + 1]) << 8) | (np.int32(codes[o + 3 * w + 2]) << 16)
                for k in range(8):
                    buf[8 * w + k] = (word >> (3 * k)) & 7
        if has_lut:
            for c in range(dim):
                buf[c] = lut[np.int32(buf[c])]

    @njit(parallel=True, fastmath=True, cache=True)
    def _qk(q, codes, scale, zero, lut, has_lut, bits, unit, group, channel_axis, t0, t1, out):
        rows, nq, dim = q.shape
        n = t1 - t0
        per = (n + CHUNKS - 1) // CHUNKS
        for job in prange(rows * CHUNKS):
            r, ch = job // CHUNKS, job % CHUNKS
            a, b = t0 + ch * per, min(t1, t0 + (ch + 1) * per)
            buf = np.empty(dim, np.float32)
            qs = np.empty((nq, dim), np.float32)
            qz = np.empty(nq, np.float32)
            u_now = -1
            for t in range(a, b):
                u = t // unit
                _unpack(codes[r, u], (t - u * unit) * dim, dim, bits, lut, has_lut, buf)
                if channel_axis:
                    if u != u_now:  # the unit's scale and zero fold into the query
                        u_now = u
                        for j in range(nq):
                            z = 0.0
                            for c in range(dim):
                                qs[j, c] = q[r, j, c] * scale[r, u, c]
                                z += q[r, j, c] * zero[r, u, c]
                            qz[j] = z
                    for j in range(nq):
                        acc = qz[j]
                        for c in range(dim):
                            acc += qs[j, c] * buf[c]
                        out[r, j, t - t0] = acc
                else:
                    for j in range(nq):
                        acc = 0.0
                        for k in range(dim // group):
                            s1 = 0.0
                            s0 = 0.0
                            for c in range(k * group, (k + 1) * group):
                                s1 += q[r, j, c] * buf[c]
                                s0 += q[r, j, c]
                            acc += s1 * scale[r, t, k] + s0 * zero[r, t, k]
                        out[r, j, t - t0] = acc

    @njit(parallel=True, fastmath=True, cache=True)
    def _pv(p, codes, scale, zero, lut, has_lut, bits, unit, group, channel_axis, t0, t1, parts):
        rows, nq, _ = p.shape
        dim = parts.shape[-1]
        n = t1 - t0
        per = (n + CHUNKS - 1) // CHUNKS
        for job in prange(rows * CHUNKS):
            r, ch = job // CHUNKS, job % CHUNKS
            a, b = t0 + ch * per, min(t1, t0 + (ch + 1) * per)
            buf = np.empty(dim, np.float32)
            out = parts[r, ch]
            accu = np.zeros((nq, dim), np.float32)
            psum = np.zeros(nq, np.float32)
            u_now = -1
            for t in range(a, b):
                u = t // unit
                if channel_axis and u != u_now:
                    if u_now >= 0:  # flush the previous unit: out += s∘(Σ p c) + z Σ p
                        for j in range(nq):
                            for c in range(dim):
                                out[j, c] += scale[r, u_now, c] * accu[j, c] + zero[r, u_now, c] * psum[j]
                                accu[j, c] = 0.0
                            psum[j] = 0.0
                    u_now = u
                _unpack(codes[r, u], (t - u * unit) * dim, dim, bits, lut, has_lut, buf)
                for j in range(nq):
                    pj = p[r, j, t - t0]
                    if channel_axis:
                        psum[j] += pj
                        for c in range(dim):
                            accu[j, c] += pj * buf[c]
                    else:
                        for k in range(dim // group):
                            w = pj * scale[r, t, k]
                            z = pj * zero[r, t, k]
                            for c in range(k * group, (k + 1) * group):
                                out[j, c] += w * buf[c] + z
            if channel_axis and u_now >= 0:
                for j in range(nq):
                    for c in range(dim):
                        out[j, c] += scale[r, u_now, c] * accu[j, c] + zero[r, u_now, c] * psum[j]


def _layout(block, t0: int, t1: int):
    """The block's arrays as the kernels take them (float32 scale/zero, a LUT, the axis)."""
    channel = block.axis == "channel"
    shape = (block.codes.shape[0], block.codes.shape[1], -1)
    scale = block.scale.reshape(shape).float().numpy()
    zero = block.zero.reshape(shape).float().numpy()
    lut = block.lut
    lut = np.zeros(1, np.float32) if lut is None else lut.float().numpy()
    return (block.codes.numpy(), scale, zero, lut, block.lut is not None, block.bits, block.unit_tokens, block.group_size, channel, t0, t1)


def scores(seg, t0: int, t1: int, qs) -> torch.Tensor:
    """``(rows, nq, t1 - t0)`` scores of the segment's keys in ``[t0, t1)``, outliers included."""
    from ..attention.fused import add_key_outliers

    q = (qs.q_rot if seg.key_hadamard else qs.q).float().contiguous()
    out = torch.empty(q.shape[0], q.shape[1], t1 - t0, dtype=torch.float32)
    _qk(q.numpy(), *_layout(seg.keys, t0, t1), out.numpy())
    if seg.key_outliers is not None:
        r, t, c, v = qs.outliers(seg.key_outliers, t0, t1, torch.float32)
        if not seg.key_hadamard:  # they replace the body's clipped value: add the difference
            v = v - seg.keys.values_at(r, t + t0, c, torch.float32)
        add_key_outliers(out, qs.q.float(), (r, t, c, v))
    return out


def values(seg, t0: int, t1: int, p: torch.Tensor, qs) -> list:
    """[plain, rotated] unnormalised outputs of the segment's values in ``[t0, t1)``."""
    from ..attention.fused import add_value_outliers

    p = p.float().contiguous()
    parts = torch.zeros(p.shape[0], CHUNKS, p.shape[1], seg.values.dim, dtype=torch.float32)
    _pv(p.numpy(), *_layout(seg.values, t0, t1), parts.numpy())
    acc = parts.sum(1)
    plain = None
    if seg.value_outliers is not None:
        r, t, c, v = qs.outliers(seg.value_outliers, t0, t1, torch.float32)
        if not seg.value_hadamard:
            v = v - seg.values.values_at(r, t + t0, c, torch.float32)
        plain = acc if not seg.value_hadamard else torch.zeros_like(acc)
        add_value_outliers(plain, p, (r, t, c, v))
    return [acc, None] if not seg.value_hadamard else [plain, acc]
