"""The read contract: a layer's history as compressed segments, for attention backends to consume.

A forward of one layer reads a :class:`LayerView`: the stored history as :class:`KVSegment` runs
(attention sinks, the packed body with its sparse outliers, the full-precision residual), each in
the domain it was stored in with the transforms a reader must apply, followed by the forward's own
keys and values at full precision. A backend may materialise it (:meth:`LayerView.dense`, the
reference) or attend on it segment by segment without ever building the dense history.

Outliers: a sparse value is the correction its position needs on top of the body's reading (the
value minus the dequantized group value, computed once when the block is compressed), so every
reader simply adds them, in the un-rotated, pre-RoPE domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import lcm
from typing import Any

import torch

from ..contracts import StoredBlock
from ..storage.raw import Raw
from ..storage.rotated import Rotated
from ..storage.sparse import SparseOutliers
from ..transforms.hadamard import hadamard_on
from ..transforms.rope import RopeTable

DECODE_QUERIES = 16  # up to this many queries per KV head, a forward is a decoding step (every backend's default)


@dataclass
class KVSegment:
    """A run of history tokens stored one way, at positions ``start .. start + tokens``."""

    start: int
    keys: StoredBlock  # in the stored domain (Hadamard-rotated when ``key_hadamard``)
    values: StoredBlock
    skip: int = 0  # leading tokens superseded by a later segment (sinks replace their groups' copies)
    key_hadamard: bool = False  # stored k H: the reader rotates the query (q H)·(k H) = q·k
    value_hadamard: bool = False  # stored v H: the reader un-rotates its output once
    key_rope: RopeTable | None = None  # keys stored before RoPE: rotate at their positions when read
    key_outliers: SparseOutliers | None = None  # positions relative to ``start``; pre-RoPE, un-rotated
    value_outliers: SparseOutliers | None = None

    @classmethod
    def of(cls, start: int, keys, values, **kw) -> "KVSegment":
        """A segment from stored blocks, unwrapping a :class:`Rotated` block into its transform flag."""
        kh, vh = isinstance(keys, Rotated), isinstance(values, Rotated)
        return cls(start, keys.inner if kh else keys, values.inner if vh else values, key_hadamard=kh, value_hadamard=vh, **kw)

    @property
    def tokens(self) -> int:
        return self.keys.tokens

    @property
    def unit(self) -> int:
        """Tokens per storage unit of both blocks (a reader slices on their boundaries; 1 unquantized)."""
        return lcm(self.keys.unit_tokens, self.values.unit_tokens)

    @property
    def plain(self) -> bool:
        """Whether the segment is full-precision keys and values as the model made them: no
        transforms, no outliers, nothing skipped (the residual)."""
        return (
            isinstance(self.keys, Raw) and isinstance(self.values, Raw) and not self.skip
            and self.key_rope is None and not self.key_hadamard and not self.value_hadamard
            and self.key_outliers is None and self.value_outliers is None
        )

    @property
    def read_from(self) -> int:
        """The first token a reader starts at: ``skip`` rounded down to whole units (the kernels and
        the tensor path mask the skipped tokens of that unit themselves)."""
        return self.skip // self.unit * self.unit

    def read(self, kind: str, dtype: torch.dtype, out: torch.Tensor) -> None:
        """Write the dense ``kind`` ("keys"/"values") of all ``tokens`` into ``out`` (rows, tokens, dim):
        the reference reader every backend must agree with."""
        block, rotated, sparse = (
            (self.keys, self.key_hadamard, self.key_outliers) if kind == "keys" else (self.values, self.value_hadamard, self.value_outliers)
        )
        block.dequantize(dtype, out=out)
        if rotated:
            out.copy_(out @ hadamard_on(out.shape[-1], out.device, dtype).T)
        if sparse is not None:
            sparse.scatter_into(out)
        if kind == "keys" and self.key_rope is not None:
            self.key_rope.rotate_(out, self.start)


@dataclass
class LayerView:
    """One forward's read of one layer: the history segments, then this forward's own keys/values.

    ``segments`` are listed so that writing each in order gives the dense history (a segment that
    supersedes another's leading tokens comes after it). Tensors are ``(rows, tokens, dim)`` with
    rows = batch x kv-heads.
    """

    segments: list[KVSegment]
    keys: torch.Tensor
    values: torch.Tensor
    batch: int
    heads: int
    backend: Any = None  # the AttentionBackend that attends on this view
    mask_offset: int = 0  # position of the first key column of the mask transformers builds
    layer: int = 0  # the model layer it belongs to (for messages)

    def grouping(self, query: torch.Tensor) -> "Grouping":
        """How ``query`` (batch, q_heads, q_len, dim) lines up with this view's KV heads."""
        b, hq, ql, d = query.shape
        return Grouping(b, hq, ql, d, self.heads, hq // self.heads)

    def is_decoding(self, query: torch.Tensor, limit: int = DECODE_QUERIES) -> bool:
        """Whether a forward of ``query`` is a decoding step: at most ``limit`` queries per KV head."""
        return self.grouping(query).nq <= limit

    def columns(self, mask: torch.Tensor, position: int, n: int) -> torch.Tensor:
        """The mask's key columns for the ``n`` keys from ``position`` on: (batch, 1, q_len, n), True = attend."""
        c0 = position - self.mask_offset
        return mask[:, :, :, c0 : c0 + n]

    @property
    def history(self) -> int:
        """The position after the last history token (that of this forward's first own token)."""
        return max((s.start + s.tokens for s in self.segments), default=0)

    @property
    def first(self) -> int:
        """The position of the first history token (above 0 where a sliding window freed older ones)."""
        return min((s.start for s in self.segments), default=0)

    def dense(self, own: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense history (from :attr:`first`) followed by the own tokens (unless ``own=False``), as
        ``(batch, heads, tokens, dim)`` keys and values."""
        rows, t, d = self.keys.shape
        t = t if own else 0
        first = self.first
        n = self.history - first
        out = []
        for kind, mine in (("keys", self.keys), ("values", self.values)):
            if not self.segments:
                out.append(mine[:, :t].view(self.batch, self.heads, t, d))
                continue
            buf = torch.empty(rows, n + t, d, dtype=mine.dtype, device=mine.device)
            for seg in self.segments:
                seg.read(kind, mine.dtype, buf[:, seg.start - first : seg.start - first + seg.tokens])
            if t:
                buf[:, n:].copy_(mine)
            out.append(buf.view(self.batch, self.heads, n + t, d))
        return out[0], out[1]


@dataclass(frozen=True)
class Grouping:
    """A query's grouped-query layout over the KV heads: rows = batch x KV heads, each row read by
    ``nq`` = group x q_len queries (the query heads of one KV head and every query position)."""

    batch: int
    q_heads: int
    q_len: int
    dim: int
    heads: int
    group: int

    @property
    def rows(self) -> int:
        return self.batch * self.heads

    @property
    def nq(self) -> int:
        return self.group * self.q_len

    def rows_of(self, query: torch.Tensor) -> torch.Tensor:
        """``query`` (batch, q_heads, q_len, dim) as (rows, nq, dim)."""
        return query.reshape(self.rows, self.nq, self.dim)

    def output(self, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-row outputs (rows, nq, dim) in the model's layout (batch, q_len, q_heads, dim)."""
        return out.to(dtype).view(self.batch, self.heads, self.group, self.q_len, self.dim).reshape(
            self.batch, self.q_heads, self.q_len, self.dim).transpose(1, 2)
