"""Group-wise asymmetric integer quantization with really packed storage.

A :class:`Quantized` tensor holds a ``(rows, tokens, dim)`` tensor (rows = batch x kv-heads) as packed
b-bit codes plus an fp16 scale and zero point per group. Groups run either

* along tokens, per channel (``axis="channel"``: one scale per channel for every ``group_size``
  tokens; KIVI/KVQuant keys), or
* along the head dimension, per token (``axis="token"``: ``group_size`` channels of one token).

Storage is organised in *units* along the token axis (``group_size`` tokens per unit for
``axis="channel"``, one token for ``axis="token"``), so appending more tokens is a concatenation and
the whole history dequantizes in one vectorised call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .packing import pack, unpack

AXES = ("channel", "token")
_MIN_SCALE = 2.0**-14  # smallest normal fp16: keeps constant groups finite


def _as_units(x: torch.Tensor, axis: str, group_size: int) -> torch.Tensor:
    """View ``(rows, tokens, dim)`` as ``(rows, units, a, b)`` with the group on dim 2 or 3."""
    rows, tokens, dim = x.shape
    if axis == "channel":
        return x.reshape(rows, tokens // group_size, group_size, dim)
    return x.reshape(rows, tokens, dim // group_size, group_size)


@dataclass
class Quantized:
    """Packed b-bit codes with fp16 scale/zero per group; see the module docstring."""

    codes: torch.Tensor  # uint8 (rows, units, packed bytes per unit)
    scale: torch.Tensor  # fp16 (rows, units, a, 1) or (rows, units, 1, b)
    zero: torch.Tensor  # fp16, same shape as scale
    bits: int
    axis: str
    group_size: int
    dim: int

    @property
    def unit_tokens(self) -> int:
        return self.group_size if self.axis == "channel" else 1

    @property
    def tokens(self) -> int:
        return self.codes.shape[1] * self.unit_tokens

    @property
    def numel(self) -> int:
        return self.codes.shape[0] * self.tokens * self.dim

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.zero]

    def append(self, other: "Quantized") -> "Quantized":
        """Concatenate ``other`` after ``self`` along the token axis (subclasses keep their extra fields)."""
        return replace(
            self,
            codes=torch.cat([self.codes, other.codes], 1),
            scale=torch.cat([self.scale, other.scale], 1),
            zero=torch.cat([self.zero, other.zero], 1),
        )

    def select_rows(self, index: torch.Tensor) -> "Quantized":
        return replace(self, codes=self.codes[index], scale=self.scale[index], zero=self.zero[index])

    @property
    def lut(self) -> torch.Tensor | None:
        """What a code stands for before scale and zero: None for integer codes (the code itself)."""
        return None

    def slice_tokens(self, start: int, stop: int) -> "Quantized":
        """Tokens ``[start, stop)`` as views (both ends on unit boundaries): a reader's block."""
        u = self.unit_tokens
        assert start % u == 0 and (stop % u == 0 or stop == self.tokens), (start, stop, u)
        a, b = start // u, -(-stop // u)
        return replace(self, codes=self.codes[:, a:b], scale=self.scale[:, a:b], zero=self.zero[:, a:b])

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The values as ``(rows, tokens, dim)`` of ``dtype``; written into ``out`` (that shape, e.g. a
        slice of a larger buffer) when given, to save the copy."""
        rows, units, _ = self.codes.shape
        a, b = (self.group_size, self.dim) if self.axis == "channel" else (self.dim // self.group_size, self.group_size)
        codes = unpack(self.codes, self.bits, a * b).view(rows, units, a, b)
        if out is not None:  # the codes convert straight into ``out``, then scale and shift in place
            o = out.view(rows, units, a, b)
            o.copy_(codes)
            torch.addcmul(self.zero.to(dtype), o, self.scale.to(dtype), out=o)
            return out
        x = torch.addcmul(self.zero.to(dtype), codes.to(dtype), self.scale.to(dtype))
        return x.reshape(rows, units * self.unit_tokens, self.dim)


def group_range(
    x: torch.Tensor, axis: str, group_size: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` as float units ``(rows, units, a, b)`` and each group's min and max (keepdim).

    Values marked in ``exclude`` (kept elsewhere: sparse outliers, sinks) take no part in the range, so
    one outlier does not widen the step of its whole group; a fully excluded group gets range [0, 0].
    """
    g = _as_units(x.float(), axis, group_size)
    reduce = 2 if axis == "channel" else 3
    if exclude is None:
        return g, g.amin(reduce, keepdim=True), g.amax(reduce, keepdim=True)
    m = _as_units(exclude, axis, group_size)
    lo = torch.where(m, torch.inf, g).amin(reduce, keepdim=True)
    hi = torch.where(m, -torch.inf, g).amax(reduce, keepdim=True)
    empty = torch.isinf(lo)
    return g, lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def quantize(
    x: torch.Tensor, bits: int, axis: str, group_size: int, exclude: torch.Tensor | None = None
) -> Quantized:
    """Quantize ``x`` of shape ``(rows, tokens, dim)`` group-wise to ``bits``.

    ``exclude`` (bool, same shape) marks values kept elsewhere (sparse outliers): they take no part in
    a group's range, so one outlier does not widen the step of its whole group.
    """
    dim = x.shape[-1]
    g, lo, hi = group_range(x, axis, group_size, exclude)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(_MIN_SCALE).half()
    zero = lo.half()
    codes = ((g - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    packed = pack(codes.flatten(2), bits)
    return Quantized(packed, scale, zero, bits, axis, group_size, dim)


@dataclass
class Raw:
    """Unquantized storage (fp16 sinks, the full-precision residual); same interface as Quantized."""

    data: torch.Tensor  # (rows, tokens, dim)

    @property
    def tokens(self) -> int:
        return self.data.shape[1]

    @property
    def numel(self) -> int:
        return self.data.numel()

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return [self.data]

    def append(self, other: "Raw") -> "Raw":
        return Raw(torch.cat([self.data, other.data], 1))

    def select_rows(self, index: torch.Tensor) -> "Raw":
        return Raw(self.data[index])

    def slice_tokens(self, start: int, stop: int) -> "Raw":
        return Raw(self.data[:, start:stop])

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is not None:
            return out.copy_(self.data)
        return self.data.to(dtype)


def encode(x: torch.Tensor, bits: int, axis: str, group_size: int, exclude: torch.Tensor | None = None):
    """``bits == 16`` keeps ``x`` as fp16; any other width quantizes it."""
    if bits == 16:
        return Raw(x.half())
    return quantize(x, bits, axis, group_size, exclude)
