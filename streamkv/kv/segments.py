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
from typing import Any

import torch

from .contracts import StoredBlock
from .rope import RopeTable
from .rotation import Rotated, hadamard_on
from .sparse import SparseOutliers

_VIEW = "streamkv_view"


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
        from math import lcm

        from .quantization import Quantized

        return lcm(*(b.unit_tokens if isinstance(b, Quantized) else 1 for b in (self.keys, self.values)))

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


def attach(keys: torch.Tensor, view: LayerView) -> torch.Tensor:
    """Hand ``view`` to the attention backend along with the keys tensor the model passes it."""
    keys.__dict__[_VIEW] = view
    return keys


def view_of(keys: torch.Tensor) -> LayerView | None:
    """The view :func:`attach` put on ``keys``; None for a plain dense tensor (any other cache)."""
    return keys.__dict__.get(_VIEW)
