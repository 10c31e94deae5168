"""CPU decode kernel, host side: attention read straight from the packed codes, one pass over the history.

The compiled loop lives in :mod:`streamkv.kv.kernels.cpu_attend`; this module decides what it
covers and lays out its inputs. ``attend`` computes one segment's share of attention for a few queries per KV head (decoding, or
short chunks) as a :class:`~streamkv.kv.attention.online_softmax.Partial`: scores, an online softmax
and the value sum in one pass over the packed bytes, so no score matrix and no dense copy of the
history is ever written. The history is split over (row, chunk) jobs across the cores
(flash-decoding's split-K); each job walks its tokens in tiles of ``TILE`` tokens held
channel-major, so every step of a tile is a contiguous vector operation over its tokens:

* keys: unpack the tile's codes, scale and shift them; keys stored before RoPE are un-rotated with
  an in-place fast Walsh-Hadamard transform (d log d adds, shared by every query of the KV head),
  take their sparse outlier corrections, then RoPE at their positions; keys stored after RoPE under
  a Hadamard rotation are scored against the rotated query instead (``(q H)·(k H) = q·k``);
* scores of each query, the online-softmax update, ``exp`` as a short polynomial (vectorisable);
* values: loaded token-major and accumulated in their stored (possibly rotated) domain; the caller
  un-rotates the merged output once.

Codes are unpacked in *word layout* (position ``k * words + i`` holds channel ``i * PER + k``, PER
codes per packing word), which makes unpacking branch-free. The query, the RoPE tables and the
outlier channels are permuted into it instead of the codes; for the Hadamard transform the
permutation is free: it only permutes index bits, which leaves a Sylvester-Hadamard matrix unchanged.

Without numba, or for a layout these kernels do not cover, the backend uses its tensor path: the
same numbers, slower; :func:`available` says so once.
"""

from __future__ import annotations

import logging
import os
import weakref
from functools import lru_cache

import numpy as np
import torch

from ..packing import codes_per_word

log = logging.getLogger(__name__)

try:  # numba is optional: a missing compiler means the eager path, never an error
    import numba
except Exception as e:  # noqa: BLE001
    numba, _why = None, f"{type(e).__name__}: {e}"
else:
    _why = ""

_warned = False
CHUNKS = 8  # token chunks per row, so that rows x chunks spread over the cores
TILE = 64  # tokens per tile: the vector length of every inner loop (64 lets LLVM use full-width SIMD)
_BITS = (2, 3, 4, 8)


def available() -> bool:
    """Whether the compiled kernel can run here (warns once, in one line, when it cannot)."""
    global _warned
    if numba is None and not _warned:
        log.warning("streamkv: numba unavailable (%s); the fused CPU backend uses its slower tensor path", _why)
        _warned = True
    return numba is not None and os.environ.get("STREAMKV_NO_KERNELS") != "1"


def covers(seg) -> bool:
    """Whether :func:`attend` reads ``seg``: packed blocks (:class:`Quantized`, with or without a
    codebook) of widths 2/3/4/8 whose tokens start on packing words (head dim a multiple of 8),
    a power-of-two head dim where the kernel un-rotates keys."""
    from ..quantization import Quantized

    def ok(block) -> bool:
        return isinstance(block, Quantized) and block.bits in _BITS and block.dim % 8 == 0

    if not (ok(seg.keys) and ok(seg.values)) or seg.keys.dim != seg.values.dim:
        return False
    d = seg.keys.dim
    return not (seg.key_rope is not None and seg.key_hadamard and d & (d - 1))


# -- layouts (host side) ---------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def word_order(bits: int, dim: int) -> torch.Tensor:
    """``order[m]`` = the channel at word-layout position ``m`` (so ``x[..., order]`` is in word layout)."""
    per = codes_per_word(bits)
    words = dim // per
    m = torch.arange(dim)
    return (m % words) * per + m // words


_rope_tables: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _rope_layout(table, end: int, dim: int, bits: int):
    """RoPE of ``table`` for positions ``< end`` as the kernel reads it, in the key word layout:
    ``cos`` and signed ``sin`` channel-major (dim, positions), and each channel's partner."""
    cos, sin = table.upto(end)
    held = _rope_tables.setdefault(table, {})
    if bits in held and held[bits][0] is cos:
        return held[bits][1]
    n, r = cos.shape
    h = r // 2
    full_cos = torch.ones(n, dim)
    full_sin = torch.zeros(n, dim)
    full_cos[:, :r] = cos
    sign = torch.cat([-torch.ones(h), torch.ones(h)])
    full_sin[:, :r] = sin * sign
    partner = torch.arange(dim)
    partner[:h], partner[h:r] = torch.arange(h, r), torch.arange(h)
    order = word_order(bits, dim)
    pos = torch.empty(dim, dtype=torch.long)
    pos[order] = torch.arange(dim)  # channel -> word position
    layout = (
        full_cos[:, order].T.contiguous().numpy(),
        full_sin[:, order].T.contiguous().numpy(),
        pos[partner[order]].numpy().astype(np.int64),
    )
    held[bits] = (cos, layout)
    return layout


def _block_arrays(block):
    shape = (block.codes.shape[0], block.codes.shape[1], -1)
    scale = block.scale.reshape(shape).float().numpy()
    zero = block.zero.reshape(shape).float().numpy()
    lut = np.zeros(1, np.float32) if block.lut is None else block.lut.float().numpy()
    return block.codes.numpy(), scale, zero, lut, block.unit_tokens, block.group_size


_NO_OUTLIERS = (np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.float32))


def _outlier_arrays(sparse, rows: int):
    if sparse is None or not sparse.count:
        return (np.zeros(rows + 1, np.int64), *_NO_OUTLIERS)
    ptr, tok, ch, val = sparse.by_row()
    return ptr.numpy(), tok.numpy(), ch.numpy(), val.numpy()


_POW2 = np.array([2.0**-i for i in range(128)], np.float32)


def attend(seg, t0: int, t1: int, qs):
    """The :class:`Partial` of ``seg``'s tokens ``[t0, t1)`` for the queries ``qs`` (see module docstring)."""
    from ..attention.online_softmax import Partial

    keys, values = seg.keys, seg.values
    rows, nq, d = qs.q.shape
    rope = seg.key_rope is not None
    kbits, vbits = keys.bits, values.bits
    query = qs.q_rot if (seg.key_hadamard and not rope) else qs.q
    qc = query.float()[..., word_order(kbits, d)].contiguous()
    qp = qs.q.float().contiguous()
    if rope:
        cosw, sinw, partner = _rope_layout(seg.key_rope, seg.start + seg.tokens + TILE, d, kbits)  # whole last tile
    else:
        cosw = sinw = np.zeros((1, 1), np.float32)
        partner = np.zeros(1, np.int64)
    mask, has_mask = np.zeros((1, 1, 1), np.bool_), False
    if qs.mask is not None:
        c0 = seg.start - qs.view.mask_offset
        m = qs.mask[:, 0, :, max(c0, 0) : c0 + t1]
        if not bool(m.all()):  # a full mask (plain decoding) needs no per-token test
            assert c0 >= 0, "a partial mask must cover the segment"
            mask, has_mask = m.contiguous().numpy(), True
    from .cpu_attend import kernel_for, merge_chunks

    kernel = kernel_for(kbits, keys.lut is not None, keys.axis == "channel", vbits, values.lut is not None,
                        values.axis == "channel", seg.key_hadamard, rope)
    m_out = np.empty((rows, CHUNKS, nq), np.float32)
    l_out = np.empty((rows, CHUNKS, nq), np.float32)
    acc = np.empty((rows, CHUNKS, nq, d), np.float32)
    accp = np.empty((rows, CHUNKS, nq, d), np.float32)
    kernel(
        qc.numpy(), qp.numpy(), *_block_arrays(keys), *_block_arrays(values), cosw, sinw, partner, seg.start,
        *_outlier_arrays(seg.key_outliers, rows), *_outlier_arrays(seg.value_outliers, rows),
        mask, has_mask, qs.view.heads, qs.ql, seg.skip, t0, t1, _POW2, m_out, l_out, acc, accp,
    )
    top, l, stored, plain = (np.empty((rows, nq, 1), np.float32), np.empty((rows, nq, 1), np.float32),
                             np.empty((rows, nq, d), np.float32), np.empty((rows, nq, d), np.float32))
    merge_chunks(m_out, l_out, acc, accp, word_order(vbits, d).numpy(), top, l, stored, plain)
    top, l, stored, plain = (torch.from_numpy(x) for x in (top, l, stored, plain))
    if seg.value_outliers is None or not seg.value_outliers.count:
        plain = None
    if not seg.value_hadamard:
        return Partial(top, l, [stored if plain is None else stored + plain, None])
    return Partial(top, l, [plain, stored])
