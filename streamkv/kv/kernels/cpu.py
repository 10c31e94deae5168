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
    """Whether these kernels read ``block``: packed widths 2/3/4/8, head dim and per-token groups in
    whole packing words (8 codes)."""
    whole = block.dim % 8 == 0 and (block.axis == "channel" or block.group_size % 8 == 0)
    return block.bits in (2, 3, 4, 8) and whole


def _kernels(bits: int, has_lut: bool, channel_axis: bool):
    """The two kernels specialised for one storage layout: ``bits``, the LUT and the axis are
    compile-time constants, so every inner loop is a branch-free run over contiguous bytes."""
    key = (bits, has_lut, channel_axis)
    if key not in _compiled:
        _compiled[key] = _build(*key)
    return _compiled[key]


_compiled: dict = {}


def _build(BITS: int, HAS_LUT: bool, CHANNEL: bool):
    PER = 8 if BITS == 3 else 8 // BITS  # codes per packing word (a byte, or 3 bytes for 3 bits)
    WBYTES = 3 if BITS == 3 else 1
    MASK = (1 << BITS) - 1

    @njit(inline="always")
    def unpack(cu, o, words, lut, buf):
        """The codes of the token starting at byte ``o`` into ``buf`` in word layout: ``buf[k * words + i]``
        is channel ``i * PER + k``. Each loop is a branch-free run over contiguous bytes (SIMD)."""
        for k in range(PER):
            for i in range(words):
                if BITS == 3:
                    w = np.int32(cu[o + 3 * i]) | (np.int32(cu[o + 3 * i + 1]) << 8) | (np.int32(cu[o + 3 * i + 2]) << 16)
                    buf[k * words + i] = np.float32((w >> (3 * k)) & 7)
                else:
                    buf[k * words + i] = np.float32((np.int32(cu[o + i]) >> (k * BITS)) & MASK)
        if HAS_LUT:
            for m in range(PER * words):
                buf[m] = lut[np.int32(buf[m])]

    @njit(inline="always")
    def span(job, t0, t1):
        """The row and token range ``[a, b)`` of one parallel job: rows x CHUNKS jobs over ``[t0, t1)``."""
        size = (t1 - t0 + CHUNKS - 1) // CHUNKS
        ch = job % CHUNKS
        return job // CHUNKS, t0 + ch * size, min(t1, t0 + (ch + 1) * size)

    @njit(inline="always")
    def to_words(x, out):
        """``x`` (n, dim) into word layout ``out`` (n, dim): column ``(c % PER) * words + c // PER``."""
        words = x.shape[1] // PER
        for j in range(x.shape[0]):
            for c in range(x.shape[1]):
                out[j, (c % PER) * words + c // PER] = x[j, c]

    @njit(parallel=True, fastmath=True)
    def qk(q, codes, scale, zero, lut, unit, group, t0, t1, out):
        """out[r, j, t - t0] = q[r, j] · k[r, t], with scale and zero folded into the query."""
        rows, nq, dim = q.shape
        words = dim // PER
        ngroups = dim // group
        for job in prange(rows * CHUNKS):
            r, a, b = span(job, t0, t1)
            buf = np.empty(dim, np.float32)
            qp = np.empty((nq, dim), np.float32)
            to_words(q[r], qp)
            qs = np.empty((nq, dim), np.float32)
            sw = np.empty((1, dim), np.float32)
            qz = np.zeros(nq, np.float32)
            gmap = np.empty(dim, np.int64)  # word-layout column -> its per-token group
            for c in range(dim):
                gmap[(c % PER) * words + c // PER] = c // group
            qsum = np.zeros((nq, ngroups), np.float32)
            for j in range(nq):
                for m in range(dim):
                    qsum[j, gmap[m]] += qp[j, m]
            u_now = -1
            for t in range(a, b):
                u = t // unit
                unpack(codes[r, u], (t - u * unit) * words * WBYTES, words, lut, buf)
                if CHANNEL:
                    if u != u_now:  # the unit's scale and zero fold into the query
                        u_now = u
                        to_words(scale[r, u : u + 1], sw)
                        for j in range(nq):
                            z = np.float32(0.0)
                            for c in range(dim):
                                z += q[r, j, c] * zero[r, u, c]
                            qz[j] = z
                            for m in range(dim):
                                qs[j, m] = qp[j, m] * sw[0, m]
                    for j in range(nq):
                        acc = np.float32(0.0)
                        for m in range(dim):
                            acc += qs[j, m] * buf[m]
                        out[r, j, t - t0] = acc + qz[j]
                else:
                    for j in range(nq):
                        for m in range(dim):
                            qs[j, m] = qp[j, m] * buf[m]
                        acc = np.float32(0.0)
                        for m in range(dim):
                            g = gmap[m]
                            acc += qs[j, m] * scale[r, t, g]
                        for g in range(ngroups):
                            acc += qsum[j, g] * zero[r, t, g]
                        out[r, j, t - t0] = acc

    @njit(parallel=True, fastmath=True)
    def pv(p, codes, scale, zero, lut, unit, group, t0, t1, parts):
        """parts[r, chunk] = Σ_t p[r, :, t] v[r, t] over the chunk's tokens (the caller sums chunks)."""
        rows, nq, _ = p.shape
        dim = parts.shape[-1]
        words = dim // PER
        ngroups = dim // group
        for job in prange(rows * CHUNKS):
            r, a, b = span(job, t0, t1)
            buf = np.empty(dim, np.float32)
            acc = np.zeros((nq, dim), np.float32)  # word layout: Σ p·s·code (token axis), Σ p·code (channel axis)
            unit_acc = np.zeros((nq, dim), np.float32)
            zacc = np.zeros((nq, ngroups), np.float32)
            psum = np.zeros(nq, np.float32)
            gmap = np.empty(dim, np.int64)
            for c in range(dim):
                gmap[(c % PER) * words + c // PER] = c // group
            w = np.empty(dim, np.float32)
            sw = np.empty((1, dim), np.float32)
            zw = np.empty((1, dim), np.float32)
            u_now = -1
            for t in range(a, b + 1):
                u = t // unit if t < b else -2
                if CHANNEL and u != u_now:
                    if u_now >= 0:  # flush the finished unit: acc += s∘(Σ p c) + z Σ p
                        to_words(scale[r, u_now : u_now + 1], sw)
                        to_words(zero[r, u_now : u_now + 1], zw)
                        for j in range(nq):
                            for m in range(dim):
                                acc[j, m] += sw[0, m] * unit_acc[j, m] + zw[0, m] * psum[j]
                                unit_acc[j, m] = 0.0
                            psum[j] = 0.0
                    u_now = u
                if t == b:
                    break
                unpack(codes[r, u], (t - u * unit) * words * WBYTES, words, lut, buf)
                if CHANNEL:
                    for j in range(nq):
                        pj = p[r, j, t - t0]
                        psum[j] += pj
                        for m in range(dim):
                            unit_acc[j, m] += pj * buf[m]
                else:
                    for m in range(dim):
                        w[m] = scale[r, t, gmap[m]] * buf[m]
                    for j in range(nq):
                        pj = p[r, j, t - t0]
                        for m in range(dim):
                            acc[j, m] += pj * w[m]
                        for g in range(ngroups):
                            zacc[j, g] += pj * zero[r, t, g]
            out = parts[r, job % CHUNKS]
            for j in range(nq):
                for c in range(dim):
                    m = (c % PER) * words + c // PER
                    out[j, c] += acc[j, m] + (0.0 if CHANNEL else zacc[j, c // group])

    return qk, pv


def _layout(block, t0: int, t1: int):
    """The block's arrays as the kernels take them (float32 scale/zero, a LUT, the axis)."""
    channel = block.axis == "channel"
    shape = (block.codes.shape[0], block.codes.shape[1], -1)
    scale = block.scale.reshape(shape).float().numpy()
    zero = block.zero.reshape(shape).float().numpy()
    lut = np.zeros(1, np.float32) if block.lut is None else block.lut.float().numpy()
    kernels = _kernels(block.bits, block.lut is not None, channel)
    return kernels, (block.codes.numpy(), scale, zero, lut, block.unit_tokens, block.group_size, t0, t1)


def scores(seg, t0: int, t1: int, qs) -> torch.Tensor:
    """``(rows, nq, t1 - t0)`` scores of the segment's keys in ``[t0, t1)``, outliers included."""
    from ..attention.fused import add_key_outliers

    q = (qs.q_rot if seg.key_hadamard else qs.q).float().contiguous()
    out = torch.empty(q.shape[0], q.shape[1], t1 - t0, dtype=torch.float32)
    (qk, _), args = _layout(seg.keys, t0, t1)
    qk(q.numpy(), *args, out.numpy())
    if seg.key_outliers is not None:
        add_key_outliers(out, qs.q.float(), qs.outliers(seg.key_outliers, t0, t1, torch.float32))
    return out


def values(seg, t0: int, t1: int, p: torch.Tensor, qs) -> list:
    """[plain, rotated] unnormalised outputs of the segment's values in ``[t0, t1)``."""
    from ..attention.fused import add_value_outliers

    p = p.float().contiguous()
    parts = torch.zeros(p.shape[0], CHUNKS, p.shape[1], seg.values.dim, dtype=torch.float32)
    (_, pv), args = _layout(seg.values, t0, t1)
    pv(p.numpy(), *args, parts.numpy())
    acc = parts.sum(1)
    plain = None
    if seg.value_outliers is not None:
        plain = acc if not seg.value_hadamard else torch.zeros_like(acc)
        add_value_outliers(plain, p, qs.outliers(seg.value_outliers, t0, t1, torch.float32))
    return [acc, None] if not seg.value_hadamard else [plain, acc]
