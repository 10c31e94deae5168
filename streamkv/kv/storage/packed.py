"""Group-wise quantization with really packed storage: the engine's base stored block.

A :class:`Quantized` block holds a ``(rows, tokens, dim)`` tensor (rows = batch x kv-heads) as packed
b-bit codes plus a scale and (optionally) a zero point per group. Groups run either

* along tokens, per channel (``axis="channel"``: one scale per channel for every ``group_size``
  tokens; KIVI/KVQuant keys), or
* along the head dimension, per token (``axis="token"``: ``group_size`` channels of one token).

Storage is organised in *units* along the token axis (``group_size`` tokens per unit for
``axis="channel"``, one token for ``axis="token"``), so appending more tokens is a concatenation and
the whole history dequantizes in one vectorised call. A code stands for itself (min-max integer
groups) or indexes a lookup table (:attr:`Quantized.lut`: the codebook blocks of
:mod:`streamkv.kv.storage.codebook`); a value reads back as ``lut[code] * scale + zero``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import dequant_kernel
from .composite import Segments
from .packing import pack, unpack
from .raw import Raw

AXES = ("channel", "token")
MIN_SCALE = 2.0**-14  # smallest normal fp16: keeps constant groups finite


def as_units(x: torch.Tensor, axis: str, group_size: int) -> torch.Tensor:
    """View ``(rows, tokens, dim)`` as ``(rows, units, a, b)`` with the group on dim 2 or 3."""
    rows, tokens, dim = x.shape
    if axis == "channel":
        return x.reshape(rows, tokens // group_size, group_size, dim)
    return x.reshape(rows, tokens, dim // group_size, group_size)


@dataclass
class Quantized:
    """Packed b-bit codes with a scale and zero per group; see the module docstring.

    ``derived`` holds what readers compute from the block once (e.g. the CPU kernel's arrays): it
    belongs to the block and dies with it; a stored block never changes (appending makes a new one).
    """

    codes: torch.Tensor  # uint8 (rows, units, packed bytes per unit)
    scale: torch.Tensor  # (rows, units, a, 1) or (rows, units, 1, b): fp16, or a subclass's encoding
    zero: torch.Tensor  # fp16, same shape as scale; or empty (no zero points)
    bits: int
    axis: str
    group_size: int
    dim: int
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def unit_tokens(self) -> int:
        return self.group_size if self.axis == "channel" else 1

    @property
    def tokens(self) -> int:
        return self.codes.shape[1] * self.unit_tokens

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def numel(self) -> int:
        return self.codes.shape[0] * self.tokens * self.dim

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    @property
    def has_zero(self) -> bool:
        return self.zero.numel() > 0

    @property
    def layout(self) -> tuple:
        """Blocks of equal layouts concatenate along tokens."""
        return (type(self).__name__, self.bits, self.axis, self.group_size, self.dim, self.scale.dtype, self.has_zero)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.zero]

    @property
    def lut(self) -> torch.Tensor | None:
        """What a code stands for before scale and zero: None for integer codes (the code itself)."""
        return None

    def scale_values(self, dtype: torch.dtype) -> torch.Tensor:
        """The scales as numbers (subclasses decode their compact scale formats here)."""
        return self.scale.to(dtype)

    def _units(self, a: int, b: int) -> "Quantized":
        return replace(self, codes=self.codes[:, a:b], scale=self.scale[:, a:b], zero=self.zero[:, a:b] if self.has_zero else self.zero)

    def append(self, other: Any) -> Any:
        """``other`` after ``self`` along the token axis: one block where the layouts agree (subclasses
        keep their extra fields), else :class:`~streamkv.kv.storage.composite.Segments`."""
        if other.layout != self.layout:
            return Segments([self]).append(other)
        return replace(
            self,
            codes=torch.cat([self.codes, other.codes], 1),
            scale=torch.cat([self.scale, other.scale], 1),
            zero=torch.cat([self.zero, other.zero], 1) if self.has_zero else self.zero,
        )

    def select_rows(self, index: torch.Tensor) -> "Quantized":
        return replace(self, codes=self.codes[index], scale=self.scale[index], zero=self.zero[index] if self.has_zero else self.zero)

    def slice_tokens(self, start: int, stop: int) -> "Quantized":
        """Tokens ``[start, stop)`` as views (both ends on unit boundaries): a reader's block."""
        u = self.unit_tokens
        assert start % u == 0 and (stop % u == 0 or stop == self.tokens), (start, stop, u)
        return self._units(start // u, -(-stop // u))

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The values as ``(rows, tokens, dim)`` of ``dtype``; written into ``out`` (that shape, e.g. a
        slice of a larger buffer) when given, to save the copy."""
        rows, units, _ = self.codes.shape
        if dtype == torch.float32 and dequant_kernel.serves(self, out):
            out = torch.empty(rows, self.tokens, self.dim) if out is None else out
            dequant_kernel.dequantize_into(self, out)
            return out
        a, b = (self.group_size, self.dim) if self.axis == "channel" else (self.dim // self.group_size, self.group_size)
        codes = unpack(self.codes, self.bits, a * b)
        lut = self.lut
        if lut is not None:  # a fresh tensor of levels: scale and shift it in place
            x = lut.to(codes.device, dtype).index_select(0, codes.reshape(-1).to(torch.int32)).view(rows, units, a, b)
            x.mul_(self.scale_values(dtype))
            if self.has_zero:
                x.add_(self.zero.to(dtype))
            x = x.view(rows, units * self.unit_tokens, self.dim)
            return x if out is None else out.copy_(x)
        codes = codes.view(rows, units, a, b)
        zero = self.zero.to(dtype) if self.has_zero else torch.zeros((), dtype=dtype, device=codes.device)
        if out is not None:  # the codes convert straight into ``out``, then scale and shift in place
            o = out.view(rows, units, a, b)
            o.copy_(codes)
            torch.addcmul(zero, o, self.scale_values(dtype), out=o)
            return out
        x = torch.addcmul(zero, codes.to(dtype), self.scale_values(dtype))
        return x.reshape(rows, units * self.unit_tokens, self.dim)


def group_range(
    x: torch.Tensor, axis: str, group_size: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` as float units ``(rows, units, a, b)`` and each group's min and max (keepdim).

    Values marked in ``exclude`` (kept elsewhere: sparse outliers, sinks) take no part in the range, so
    one outlier does not widen the step of its whole group; a fully excluded group gets range [0, 0].
    """
    g = as_units(x.float(), axis, group_size)
    reduce = 2 if axis == "channel" else 3
    if exclude is None:
        return g, g.amin(reduce, keepdim=True), g.amax(reduce, keepdim=True)
    m = as_units(exclude, axis, group_size)
    lo = torch.where(m, torch.inf, g).amin(reduce, keepdim=True)
    hi = torch.where(m, -torch.inf, g).amax(reduce, keepdim=True)
    empty = torch.isinf(lo)
    return g, lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def quantize(
    x: torch.Tensor, bits: int, axis: str, group_size: int, exclude: torch.Tensor | None = None
) -> Quantized:
    """Min-max (asymmetric) groups of ``x`` (rows, tokens, dim) at ``bits``, an fp16 scale and zero each.

    ``exclude`` (bool, same shape) marks values kept elsewhere (sparse outliers): they take no part in
    a group's range, so one outlier does not widen the step of its whole group.
    """
    dim = x.shape[-1]
    g, lo, hi = group_range(x, axis, group_size, exclude)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(MIN_SCALE).half()
    zero = lo.half()
    codes = ((g - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    packed = pack(codes.flatten(2), bits)
    return Quantized(packed, scale, zero, bits, axis, group_size, dim)


def encode(x: torch.Tensor, bits: int, axis: str, group_size: int, exclude: torch.Tensor | None = None):
    """``bits == 16`` keeps ``x`` as fp16; any other width quantizes it (sinks)."""
    if bits == 16:
        return Raw(x.half())
    return quantize(x, bits, axis, group_size, exclude)
