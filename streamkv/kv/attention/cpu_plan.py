"""How the CPU kernel reads a segment: its stored blocks cut into the pieces one kernel call serves.

A kernel call is specialised for one layout (widths, codebooks, axes) and reads one key block and one
value block. A plain segment is one piece. The budgeted presets store composites: a body whose width
changed between chunks (:class:`~streamkv.kv.storage.composite.Segments`: intervals of tokens) and
blocks whose rows (KV heads) have widths of their own (:class:`~streamkv.kv.storage.composite.RowSplit`).
Such a segment is read interval by interval (each interval a partial softmax of its own, merged with
the others like any segment), and within an interval by groups of rows that share their key and
value widths, each group one call writing its own rows. The plan is made once per stored block and
held by it (a stored block never changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels.cpu_layout import TILE
from ..storage.composite import RowSplit, Segments
from ..storage.packed import Quantized

WIDTHS = (2, 3, 4, 8)  # the packed widths the kernel reads


@dataclass(frozen=True)
class Piece:
    """One kernel call: tokens ``off .. off + tokens`` of the segment, for its rows ``rows``; they are
    tokens ``koff ..`` of the leaf block ``keys`` and ``voff ..`` of ``values`` (whole stored blocks,
    never copies), and segment row ``g`` is row ``krow[g]`` / ``vrow[g]`` of them."""

    keys: Quantized
    values: Quantized
    off: int
    tokens: int
    koff: int
    voff: int
    rows: np.ndarray
    krow: np.ndarray
    vrow: np.ndarray


def _leaf(block) -> bool:
    return isinstance(block, Quantized) and block.bits in WIDTHS and block.dim % 8 == 0


def _intervals(block) -> list[tuple[int, object]]:
    """(first token, part) of a block's parts in time (one part unless it is a Segments)."""
    if isinstance(block, Segments):
        return list(zip(block.starts(), block.parts))
    return [(0, block)]


def _rows(part, n_rows: int) -> list[tuple[np.ndarray, Quantized, np.ndarray]]:
    """(segment rows, leaf block, row map) per width of ``part``; None where a leaf is not kernel-readable."""
    if isinstance(part, RowSplit):
        out = []
        for rows, leaf in zip(part.rows(), part.parts):
            rows = rows.numpy().astype(np.int64)
            where = np.full(n_rows, -1, np.int64)
            where[rows] = np.arange(len(rows))
            out.append((rows, leaf, where))
        return out
    return [(np.arange(n_rows, dtype=np.int64), part, np.arange(n_rows, dtype=np.int64))]


def plan(keys, values, n_rows: int) -> list[list[Piece]] | None:
    """The segment's pieces, interval by interval (None: the kernel does not read it)."""
    kparts, vparts = _intervals(keys), _intervals(values)
    bounds = sorted({0, keys.tokens} | {s for s, _ in kparts} | {s for s, _ in vparts})
    out = []
    for a, b in zip(bounds, bounds[1:]):
        if a % TILE:
            return None
        kstart, kpart = next((s, p) for s, p in reversed(kparts) if s <= a)
        vstart, vpart = next((s, p) for s, p in reversed(vparts) if s <= a)
        pieces = []
        for krows, kleaf, kmap in _rows(kpart, n_rows):
            for vrows, vleaf, vmap in _rows(vpart, n_rows):
                rows = np.intersect1d(krows, vrows)
                if len(rows):
                    if not (_leaf(kleaf) and _leaf(vleaf)) or kleaf.dim != vleaf.dim:
                        return None
                    pieces.append(Piece(kleaf, vleaf, a, b - a, a - kstart, a - vstart, rows, kmap, vmap))
        out.append(pieces)
    return out


def pieces(seg, n_rows: int) -> list[list[Piece]] | None:
    """:func:`plan` of ``seg``'s blocks, made once and held by its key block."""
    held = getattr(seg.keys, "derived", None)
    if held is None:
        return None
    cached = held.get("cpu-plan")
    if cached is None or cached[0] is not seg.values or cached[1] != n_rows:
        cached = held["cpu-plan"] = (seg.values, n_rows, plan(seg.keys, seg.values, n_rows))
    return cached[2]
