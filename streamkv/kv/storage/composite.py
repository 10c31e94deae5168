"""Blocks made of blocks: a stream whose width changed mid-way, a block whose rows have different widths,
and a reader's view of part of a group.

* :class:`Segments`: consecutive token ranges stored in different layouts (a budgeted quantizer
  changed a width between chunks): what ``append`` of blocks whose layouts differ makes.
* :class:`RowSplit`: one block whose rows (batch x kv-heads) are stored at different widths
  (per-head mixed precision); :func:`split_rows` builds it.
* :class:`TokenSlice`: tokens inside groups that span more tokens (a reader's window that does not
  start on a group boundary).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from functools import cached_property
from math import lcm
from typing import Any, Callable

import torch

from . import dequant_kernel
from .rotated import Rotated


def compact(block: Any) -> Any:
    """``block`` in tensors of its own: after slicing off freed tokens, the freed memory really goes."""
    if isinstance(block, Rotated):
        return Rotated(compact(block.inner))
    if isinstance(block, Segments):
        return Segments([compact(p) for p in block.parts])
    if isinstance(block, RowSplit):
        return RowSplit(block.widths, [compact(p) for p in block.parts], block.dim)
    assert is_dataclass(block) and not isinstance(block, TokenSlice), type(block)
    own = {f.name: getattr(block, f.name).clone() for f in fields(block) if f.init and isinstance(getattr(block, f.name), torch.Tensor)}
    return replace(block, **own)


@dataclass
class TokenSlice:
    """Tokens ``offset .. offset + length`` of ``block`` (whose groups span more tokens): a reader's view."""

    block: Any
    offset: int
    length: int

    unit_tokens = 1

    @property
    def tokens(self) -> int:
        return self.length

    @property
    def dim(self) -> int:
        return self.block.dim

    @property
    def device(self) -> torch.device:
        return self.block.device

    def slice_tokens(self, start: int, stop: int) -> "TokenSlice":
        return TokenSlice(self.block, self.offset + start, stop - start)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        x = self.block.dequantize(dtype)[:, self.offset : self.offset + self.length]
        return x if out is None else out.copy_(x)


def slice_block(block: Any, start: int, stop: int) -> Any:
    """Tokens ``[start, stop)`` of ``block``: its own slice where both ends fall on its units, else a
    :class:`TokenSlice` of the units that cover them."""
    u = block.unit_tokens
    if isinstance(block, (Segments, RowSplit)) or (start % u == 0 and (stop % u == 0 or stop == block.tokens)):
        return block.slice_tokens(start, stop)
    a, b = start // u * u, min(block.tokens, -(-stop // u) * u)
    return TokenSlice(block.slice_tokens(a, b), start - a, stop - start)


class _Parts:
    """What a block made of ``parts`` answers from them (held once asked: a stored block never changes,
    and readers ask on every decoding step)."""

    parts: list

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @cached_property
    def unit_tokens(self) -> int:
        return lcm(*(p.unit_tokens for p in self.parts))

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.parts)


@dataclass
class Segments(_Parts):
    """Consecutive token ranges stored in different layouts (a width that changed mid-stream)."""

    parts: list = field(default_factory=list)
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # readers' plans of it

    @cached_property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.parts)

    @property
    def dim(self) -> int:
        return self.parts[0].dim

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def layout(self) -> tuple:
        return self.parts[0].layout if len(self.parts) == 1 else ("segments", tuple(p.layout for p in self.parts))

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.parts for t in p.tensors()]

    def starts(self) -> list[int]:
        """Each part's first token."""
        out, t = [], 0
        for p in self.parts:
            out.append(t)
            t += p.tokens
        return out

    def append(self, other) -> "Segments":
        parts = list(self.parts)
        for o in other.parts if isinstance(other, Segments) else [other]:
            if parts and parts[-1].layout == o.layout:
                parts[-1] = parts[-1].append(o)
            else:
                parts.append(o)
        return Segments(parts)

    def slice_tokens(self, start: int, stop: int) -> "Segments":
        out = []
        for t0, p in zip(self.starts(), self.parts):
            a, b = max(start, t0), min(stop, t0 + p.tokens)
            if a < b:
                out.append(slice_block(p, a - t0, b - t0))
        return Segments(out)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return torch.cat([p.dequantize(dtype) for p in self.parts], 1)
        for t0, p in zip(self.starts(), self.parts):
            p.dequantize(dtype, out=out[:, t0 : t0 + p.tokens])
        return out


@dataclass
class RowSplit(_Parts):
    """One block whose rows (batch x kv-heads) are stored at different widths: ``widths`` (uint8, one
    per row, held and counted) says which, each part holds the rows of one width, ascending."""

    widths: torch.Tensor  # uint8 (rows,)
    parts: list
    dim: int
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # readers' plans of it

    @cached_property
    def tokens(self) -> int:
        return self.parts[0].tokens

    @property
    def nbytes(self) -> int:
        return self.widths.nbytes + sum(p.nbytes for p in self.parts)

    @property
    def layout(self) -> tuple:
        return ("rows", tuple(self.widths.tolist()), tuple(p.layout for p in self.parts))

    def tensors(self) -> list[torch.Tensor]:
        return [self.widths] + [t for p in self.parts for t in p.tensors()]

    def rows(self) -> list[torch.Tensor]:
        """The row indices of each part."""
        return [(self.widths == b).nonzero().squeeze(1) for b in torch.unique(self.widths).tolist()]

    def append(self, other: Any) -> Any:
        if other.layout != self.layout:
            return Segments([self]).append(other)
        return RowSplit(self.widths, [a.append(b) for a, b in zip(self.parts, other.parts)], self.dim)

    def slice_tokens(self, start: int, stop: int) -> "RowSplit":
        return RowSplit(self.widths, [slice_block(p, start, stop) for p in self.parts], self.dim)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(self.widths.numel(), self.tokens, self.dim, dtype=dtype, device=self.device)
        for rows, p in zip(self.rows(), self.parts):
            if dequant_kernel.serves(p, out):  # straight into its rows
                dequant_kernel.dequantize_into(p, out, rows)
            else:
                out.index_copy_(0, rows.to(out.device), p.dequantize(dtype))
        return out


def split_rows(widths: list[int], encode: Callable[[torch.Tensor | None, int], Any], dim: int) -> Any:
    """``encode(rows, bits)`` for each distinct width of ``widths`` (one per row); a :class:`RowSplit`
    unless every row has the same width. A rotation common to every part stays outside."""
    distinct = sorted(set(widths))
    if len(distinct) == 1:
        return encode(None, distinct[0])
    w = torch.tensor(widths, dtype=torch.uint8)
    parts = [encode((w == b).nonzero().squeeze(1), b) for b in distinct]
    if all(isinstance(p, Rotated) for p in parts):
        return Rotated(RowSplit(w, [p.inner for p in parts], dim))
    return RowSplit(w, parts, dim)
