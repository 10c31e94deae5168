"""CPU decode kernel, host side: attention read straight from the packed codes, one pass over the history.

The compiled loop lives in :mod:`streamkv.kv.kernels.cpu_attend` (tiles: ``cpu_tiles``, reductions:
``cpu_merge``, layout constants: ``cpu_layout``); this module decides what it covers and lays out
its inputs. :func:`decode` runs a
whole decoding step of a layer: each packed segment read in one pass over its bytes (scores, an
online softmax and the value sum together, so no score matrix and no dense copy of the history is
ever written), then the full-precision residual and the forward's own tokens, the merge of every
part and the values' un-rotation in one compiled call (a segment whose storage is composite, as the
budgeted presets' is, is read piece by piece: :mod:`.cpu_plan`). :func:`attend` reads one segment as a
:class:`~streamkv.kv.attention.online_softmax.Partial` for the fused backend's mixed path (a
segment the kernel does not cover beside ones it does). The history is split over (row, chunk) jobs
across the cores (flash-decoding's split-K); each job walks its tokens in tiles of ``TILE`` tokens
held channel-major, so every step of a tile is a contiguous vector operation over its tokens:

* keys: unpack the tile's codes (a whole tile's bytes transposed as 32-bit words first), scale and
  shift them; keys stored before RoPE are un-rotated with an in-place fast Walsh-Hadamard transform
  (d log d adds, shared by every query of the KV head), take their sparse outlier corrections, then
  RoPE at their positions by angle addition (a small per-tile table, not one row per position);
  keys stored after RoPE under a Hadamard rotation are scored against the rotated query instead
  (``(q H)·(k H) = q·k``);
* scores of each query, the online-softmax update, ``exp`` as a short polynomial with its power of
  two built in the exponent bits (vectorisable);
* values: loaded token-major and accumulated in their stored (possibly rotated) domain; the merged
  output is un-rotated once.

Codes are unpacked in *word layout* (position ``k * words + i`` holds channel ``i * PER + k``, PER
codes per packing word), which makes unpacking branch-free. The query, the RoPE tables and the
outlier channels are permuted into it instead of the codes; for the Hadamard transform the
permutation is free: it only permutes index bits, which leaves a Sylvester-Hadamard matrix unchanged.

Without numba, or for a layout these kernels do not cover, the backend uses its tensor path: the
same numbers, slower; :func:`available` says so once.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import torch

from ..kernels import compiled_cpu, numba_installed
from ..kernels.cpu_layout import TILE, word_order
from ..storage.dequant_kernel import arrays
from ..transforms.hadamard import hadamard
from .cpu_plan import Piece, pieces
from .online_softmax import Partial, merge_all

log = logging.getLogger(__name__)

CHUNKS = 8  # token chunks per row, so that rows x chunks spread over the cores
_warned = False


def available() -> bool:
    """Whether the compiled kernel can run here (warns once, in one line, when numba is missing)."""
    global _warned
    if not numba_installed() and not _warned:
        log.warning("streamkv: numba is not installed; the fused CPU backend uses its slower tensor path")
        _warned = True
    return compiled_cpu()


def covers(seg, rows: int) -> bool:
    """Whether the kernel reads ``seg`` (of ``rows`` = batch x KV heads rows): packed blocks of widths
    2/3/4/8 (codebooks too; composites of them) whose tokens start on packing words (head dim a
    multiple of 8), a power-of-two head dim where the kernel un-rotates keys."""
    if pieces(seg, rows) is None:
        return False
    d = seg.keys.dim
    return not (seg.key_rope is not None and seg.key_hadamard and d & (d - 1))


# -- layouts (host side) ---------------------------------------------------------------------------------
def _rope_layout(table, start: int, end: int, dim: int, bits: int):
    """RoPE of ``table`` as the kernel reads it, in the key word layout, for tiles of ``TILE`` tokens
    from position ``start`` up to ``end``. By angle addition, ``cos θ(p0 + t)`` and ``sin θ(p0 + t)``
    come from the tile's base angle ``θ p0`` and the offset ``θ t``: the kernel reads a (dim, TILE)
    offset table and four coefficients per tile and channel instead of a (dim, positions) table per
    row, which at a few thousand tokens is larger than the compressed history itself.

    Returns ``cos θt``, ``sin θt`` (dim, TILE), per tile ``k`` and channel ``m`` the coefficients
    ``(A1, B1, A2, B2)`` (tiles, 4, dim) of ``out = cos θt (A1 x + B1 y) + sin θt (A2 x + B2 y)``
    with ``y = x[partner]``, and the partner of each position."""
    cos, sin = table.upto(end + TILE)
    held = table.derived  # the table's own: its layouts die with it
    key = ("cpu", bits, start)
    if key in held and held[key][0] is cos:
        return held[key][1]
    n, r = cos.shape
    h = r // 2
    order = torch.from_numpy(word_order(bits, dim))
    tiles = (n - start) // TILE
    a = cos[0]  # cos(0) = the table's attention scaling (yarn / longrope), kept by the base only
    co, so = torch.ones(TILE, dim), torch.zeros(TILE, dim)
    co[:, :r], so[:, :r] = cos[:TILE] / a, sin[:TILE] / a
    cb, sb = torch.ones(tiles, dim), torch.zeros(tiles, dim)
    cb[:, :r], sb[:, :r] = cos[start : start + tiles * TILE : TILE], sin[start : start + tiles * TILE : TILE]
    sign = torch.zeros(dim)
    sign[:h], sign[h:r] = -1.0, 1.0  # rotate_half: out_i = x_i cos - x_{i+h} sin, out_{i+h} = x_{i+h} cos + x_i sin
    coef = torch.stack([cb, sign * sb, -sb, sign * cb], 1)  # (tiles, 4, dim)
    partner = torch.arange(dim)
    partner[:h], partner[h:r] = torch.arange(h, r), torch.arange(h)
    pos = torch.empty(dim, dtype=torch.long)
    pos[order] = torch.arange(dim)  # channel -> word position
    layout = (
        co[:, order].T.contiguous().numpy(),
        so[:, order].T.contiguous().numpy(),
        coef[:, :, order].contiguous().numpy(),
        pos[partner[order]].numpy().astype(np.int64),
    )
    if len(held) >= 8:  # a sliding window moves its segments' start: keep the recent layouts only
        held.clear()
    held[key] = (cos, layout)
    return layout


_NO_OUTLIERS = (np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.float32))


def _outlier_arrays(sparse, rows: int):
    if sparse is None or not sparse.count:
        return (np.zeros(rows + 1, np.int64), *_NO_OUTLIERS)
    ptr, tok, ch, val = sparse.by_row()
    return ptr.numpy(), tok.numpy(), ch.numpy(), val.numpy()


_NO_ROPE = (np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32), np.zeros((1, 4, 1), np.float32), np.zeros(1, np.int64))
_NO_MASK = np.zeros((1, 1, 1), np.bool_)


def _columns(view, mask: torch.Tensor | None, position: int, n: int) -> tuple[np.ndarray, bool]:
    """The mask's columns of the ``n`` keys from ``position`` as the kernels read them, and whether any
    is masked: a full mask (plain decoding) needs no per-token test."""
    if mask is None:
        return _NO_MASK, False
    m = view.columns(mask, position, n)[:, 0]
    if bool(m.all()):
        return _NO_MASK, False
    return m.contiguous().numpy(), True


def _version(sparse) -> int:
    return -1 if sparse is None else sparse.version


def _calls(seg, rows: int, d: int, ql: int, heads: int, t0: int, t1: int) -> list[list[tuple]]:
    """For each interval of ``seg`` holding tokens of ``[t0, t1)``: each piece's kernel, whether it
    scores the rotated query, and the arguments of its call that stay fixed while the segment is
    stored (all but the step's queries, mask columns and outputs). Made once per state of the
    segment (position, tokens, outlier versions) and held by its key block, since every decoding
    step reads every piece: a step then costs one dispatch per piece and no host work."""
    key = (seg.start, seg.tokens, seg.skip, seg.key_rope is not None, seg.key_hadamard,
           _version(seg.key_outliers), _version(seg.value_outliers), rows, d, ql, heads, t0, t1)
    held = seg.keys.derived.get("cpu-calls")
    if held is not None and held[0] is seg.values and held[1] == key:
        return held[2]
    from ..kernels.cpu_attend import kernel_for  # numba: imported where the kernel runs

    rope = seg.key_rope is not None
    scored_rotated = seg.key_hadamard and not rope
    outliers = (*_outlier_arrays(seg.key_outliers, rows), *_outlier_arrays(seg.value_outliers, rows))
    calls = []
    for group in _intervals(seg, rows, t0, t1):
        interval = []
        for piece in group:
            keys, values = piece.keys, piece.values
            # the base of every tile up to the segment's last (the table reaches a tile past it)
            rope_args = _rope_layout(seg.key_rope, seg.start, seg.start + seg.tokens, d, keys.bits) if rope else _NO_ROPE
            kernel = kernel_for(keys.bits, keys.lut is not None, keys.axis == "channel", values.bits,
                                values.lut is not None, values.axis == "channel", seg.key_hadamard, rope)
            a, b = max(t0, piece.off) - piece.off, min(t1, piece.off + piece.tokens) - piece.off  # in the piece's tokens
            chunks = max(1, min(CHUNKS, (b - a) // (2 * TILE)))  # a short segment (sinks) is one job per row
            fixed = (word_order(keys.bits, d), word_order(values.bits, d), *arrays(keys), *arrays(values), *rope_args,
                     *outliers, heads, ql, seg.skip, a, b, chunks, piece.rows, piece.krow, piece.vrow, piece.off,
                     piece.koff, piece.voff)
            interval.append((kernel, scored_rotated, fixed))
        calls.append(interval)
    seg.keys.derived["cpu-calls"] = (seg.values, key, calls)
    return calls


def _read(seg, calls: list[list[tuple]], q, q_rot, mask, view, t1: int, top, l, stored, plain, first: int = 0) -> None:
    """Run ``seg``'s kernel calls (:func:`_calls`, for its tokens up to ``t1``) for the queries ``q``:
    interval ``i``'s softmax statistics into ``top[first + i]``, ``l`` (slots, rows, nq, 1) and its
    value sums into ``stored`` (the stored domain) and ``plain`` (outliers)."""
    cols, has_mask = _columns(view, mask, seg.start, t1)
    for i, interval in enumerate(calls):
        for kernel, scored_rotated, fixed in interval:
            kernel(q_rot if scored_rotated else q, q, cols, has_mask, top, l, stored, plain, first + i, *fixed)


def _intervals(seg, rows: int, t0: int, t1: int) -> list[list[Piece]]:
    """The intervals of ``seg``'s plan that hold tokens of ``[t0, t1)``."""
    return [group for group in pieces(seg, rows) if group[0].off < t1 and group[0].off + group[0].tokens > t0]


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.float().contiguous().numpy()


def attend(seg, t0: int, t1: int, qs):
    """The :class:`Partial` of ``seg``'s tokens ``[t0, t1)`` for the queries ``qs`` (see module docstring)."""
    rows, nq, d = qs.q.shape
    q, q_rot = _numpy(qs.q), None if qs.q_rot is None else _numpy(qs.q_rot)
    calls = _calls(seg, rows, d, qs.ql, qs.view.heads, t0, t1)
    n = len(calls)
    top, l = np.empty((n, rows, nq, 1), np.float32), np.empty((n, rows, nq, 1), np.float32)
    stored, plain = np.empty((n, rows, nq, d), np.float32), np.empty((n, rows, nq, d), np.float32)
    _read(seg, calls, q, q_rot, qs.mask, qs.view, t1, top, l, stored, plain)
    outliers = seg.value_outliers is not None and seg.value_outliers.count
    parts = []
    for i in range(n):
        ti, li, si, pi = (torch.from_numpy(x[i]) for x in (top, l, stored, plain))
        if not seg.value_hadamard:
            parts.append(Partial(ti, li, [si + pi if outliers else si, None]))
        else:
            parts.append(Partial(ti, li, [pi if outliers else None, si]))
    return merge_all(parts)


@lru_cache(maxsize=None)
def _hadamard(d: int) -> tuple[np.ndarray, np.ndarray]:
    h = hadamard(d).float()
    return h.numpy().copy(), h.T.contiguous().numpy()


def _residual(view) -> bool:
    """Whether the view's last segment is the full-precision residual, ending where the own tokens
    begin: :func:`decode` reads it with them."""
    return bool(view.segments) and view.segments[-1].plain and view.segments[-1].start + view.segments[-1].tokens == view.history


def decodes(view) -> bool:
    """Whether :func:`decode` serves ``view``: every segment covered, but for a trailing residual."""
    segs = view.segments[:-1] if _residual(view) else view.segments
    rows = view.batch * view.heads
    return available() and all(covers(seg, rows) for seg in segs)


def decode(view, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """A whole decoding step of one layer (see :func:`decodes`): each packed segment read by the
    kernel into its slot, then the full-precision residual and the forward's own tokens, the merge of
    every part and the values' un-rotation in one compiled pass that writes the output in the model's
    layout, so a step costs a handful of calls instead of a hundred small tensor operations.
    ``query`` (batch, q_heads, q_len, dim) → (batch, q_len, q_heads, dim): the numbers of the fused
    backend's segment-wise path."""
    from ..kernels.cpu_merge import finish

    gq = view.grouping(query)
    rows, nq, d, ql = gq.rows, gq.nq, gq.dim, gq.q_len
    q = _numpy(gq.rows_of(query.float() * scaling))
    segs = view.segments
    res_k = res_v = view.keys[:, :0]
    if _residual(view):
        res_k, res_v = segs[-1].keys.data, segs[-1].values.data
        segs = segs[:-1]
    reads = [_calls(seg, rows, d, ql, view.heads, seg.read_from, seg.tokens) for seg in segs]
    rotated = np.array([seg.value_hadamard for seg, calls in zip(segs, reads) for _ in calls], np.bool_)
    rot, unrot = _hadamard(d)
    q_rot = q @ rot if any(s.key_hadamard for s in segs) else q
    n = len(rotated)
    top, l = np.empty((n, rows, nq, 1), np.float32), np.empty((n, rows, nq, 1), np.float32)
    stored, plain = np.empty((n, rows, nq, d), np.float32), np.empty((n, rows, nq, d), np.float32)
    first = 0
    for seg, calls in zip(segs, reads):
        _read(seg, calls, q, q_rot, mask, view, seg.tokens, top, l, stored, plain, first)
        first += len(calls)
    tail = res_k.shape[1] + view.keys.shape[1]  # the residual and the own tokens
    cols, has_mask = _columns(view, mask, view.history - res_k.shape[1], tail)
    out = np.empty((gq.batch, ql, gq.q_heads, d), np.float32)
    finish(q, _numpy(res_k), _numpy(res_v), _numpy(view.keys), _numpy(view.values), cols, has_mask, ql, view.heads,
           top, l, stored, plain, rotated, unrot, out)
    return torch.from_numpy(out).to(query.dtype)
