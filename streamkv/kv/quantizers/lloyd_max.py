"""Lloyd-Max codebook groups after a Hadamard rotation: data-oblivious, no calibration, lean metadata.

Each group (keys: one channel over ``key_group_size`` tokens, before RoPE; values: ``value_group_size``
channels of one token) of the rotated head dimension is stored as b-bit indices into the fixed
Lloyd-Max codebook of N(0, 1) (:mod:`streamkv.kv.codebooks`), scaled by one statistic of the group and,
where it pays, shifted by the group's mean:

* ``scale``: ``rms`` (the group's root-mean-square deviation: the codebook is MSE-optimal for a
  Gaussian of that standard deviation), ``absmax`` (the outermost level at the group's largest
  magnitude: nothing clips), or ``mse`` (the scale among a few candidates around the RMS that gives
  the group's smallest squared error; the search runs at encode time and stores nothing more);
* ``scale_format``: ``fp16``, or ``log8``: one byte per group, ``2**((code - 160) / 8)`` (steps of
  9%, 2**-20 to 2**12), half the bytes of fp16;
* ``key_zero`` / ``value_zero``: ``mean`` stores the group's mean as fp16 and codes the deviation
  from it (keys, whose channels carry a steady offset), ``none`` codes the values as they are
  (rotated values are centred).

Values that are stored elsewhere (sinks, sparse outliers) take no part in the statistics: before the
rotation they are replaced by their channel's mean over the block (so they disturb no rotated
coordinate), and whole tokens stored elsewhere (sinks) are left out of the group statistics.

``budget_bits`` switches on mixed precision: see :mod:`streamkv.kv.allocation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch

from ..codebooks import LLOYD_MAX_BITS, check_bits, gaussian_mse, lloyd_max, thresholds
from ..errors import check, one_of
from ..packing import pack, unpack
from ..quantization import _MIN_SCALE, _as_units, quantize
from ..rotation import Rotated, hadamard_on, is_power_of_two
from .per_token import GroupedQuantizer, group_for

SCALES = ("rms", "absmax", "mse")
SCALE_FORMATS = ("fp16", "log8")
ZEROS = ("mean", "none")
CODEBOOKS = ("lloyd_max", "minmax")
GRANULARITIES = ("layer", "head")
RECONSTRUCTIONS = ("centroid", "unbiased", "projection")
_LOG_STEPS, _LOG_BIAS = 8, 160  # log8 scale = 2 ** ((code - _LOG_BIAS) / _LOG_STEPS)
_MSE_GRID = (0.75, 0.82, 0.89, 0.95, 1.0, 1.06, 1.13, 1.22)  # candidate multiples of the RMS (scale=mse)


def encode_scale(s: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "fp16":
        return s.clamp_min(_MIN_SCALE).half()
    code = torch.round(torch.log2(s.clamp_min(2.0**-30)) * _LOG_STEPS) + _LOG_BIAS
    return code.clamp_(0, 255).to(torch.uint8)


def decode_scale(stored: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if stored.dtype == torch.uint8:
        return torch.exp2((stored.to(torch.float32) - _LOG_BIAS) / _LOG_STEPS).to(dtype)
    return stored.to(dtype)


@dataclass
class LloydMaxQuantized:
    """Packed b-bit Lloyd-Max codes of ``(rows, tokens, dim)`` with one scale (and optional zero) per group.

    The :class:`~streamkv.kv.contracts.StoredBlock` interface of :class:`~streamkv.kv.quantization.Quantized`.
    The codebook is a constant of the bit width (regenerated, like the Hadamard matrix), not cache state.
    """

    codes: torch.Tensor  # uint8 (rows, units, packed bytes per unit)
    scale: torch.Tensor  # fp16 or uint8 (log8), (rows, units, a, 1) or (rows, units, 1, b)
    zero: torch.Tensor  # fp16 like scale, or empty (no zero points)
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
        return sum(t.nbytes for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.zero]

    def append(self, other):
        if _layout(other) == _layout(self):
            return replace(
                self,
                codes=torch.cat([self.codes, other.codes], 1),
                scale=torch.cat([self.scale, other.scale], 1),
                zero=torch.cat([self.zero, other.zero], 1) if self.zero.numel() else self.zero,
            )
        return Segments([self]).append(other)

    def slice_tokens(self, start: int, stop: int):
        """Tokens ``[start, stop)``: views when both ends are on unit boundaries, else a reading slice."""
        u = self.unit_tokens
        if start % u or (stop % u and stop != self.tokens):
            return _covering_slice(self, start, stop)
        a, b = start // u, -(-stop // u)
        return replace(self, codes=self.codes[:, a:b], scale=self.scale[:, a:b], zero=self.zero[:, a:b] if self.zero.numel() else self.zero)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        rows, units, _ = self.codes.shape
        a, b = (self.group_size, self.dim) if self.axis == "channel" else (self.dim // self.group_size, self.group_size)
        codes = unpack(self.codes, self.bits, a * b).reshape(-1).to(torch.int32)
        x = lloyd_max(self.bits).to(self.codes.device, dtype).index_select(0, codes).view(rows, units, a, b)
        x.mul_(decode_scale(self.scale, dtype))
        if self.zero.numel():
            x.add_(self.zero.to(dtype))
        x = x.view(rows, units * self.unit_tokens, self.dim)
        return x if out is None else out.copy_(x)


@dataclass
class TokenSlice:
    """Tokens ``offset .. offset + length`` of ``block`` (whose groups span more tokens): a reader's view."""

    block: Any
    offset: int
    length: int

    @property
    def tokens(self) -> int:
        return self.length

    @property
    def dim(self) -> int:
        return self.block.dim

    @property
    def codes(self) -> torch.Tensor:
        return self.block.codes

    def slice_tokens(self, start: int, stop: int) -> "TokenSlice":
        return TokenSlice(self.block, self.offset + start, stop - start)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        x = self.block.dequantize(dtype)[:, self.offset : self.offset + self.length]
        return x if out is None else out.copy_(x)


def _covering_slice(block, start: int, stop: int) -> TokenSlice:
    u = getattr(block, "unit_tokens", 1)
    a, b = start // u * u, min(block.tokens, -(-stop // u) * u)
    return TokenSlice(block.slice_tokens(a, b), start - a, stop - start)


@dataclass
class Segments:
    """Consecutive token ranges stored in different layouts (a width that changed mid-stream)."""

    parts: list = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.parts)

    @property
    def dim(self) -> int:
        return self.parts[0].dim

    @property
    def codes(self) -> torch.Tensor:
        """The first part's codes (where the data lives, for readers that ask)."""
        return self.parts[0].codes

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def tensors(self) -> list[torch.Tensor]:
        return [t for p in self.parts for t in p.tensors()]

    def append(self, other) -> "Segments":
        parts = list(self.parts)
        for o in other.parts if isinstance(other, Segments) else [other]:
            if parts and _layout(parts[-1]) == _layout(o):
                parts[-1] = parts[-1].append(o)
            else:
                parts.append(o)
        return Segments(parts)

    def slice_tokens(self, start: int, stop: int) -> "Segments":
        out, t0 = [], 0
        for p in self.parts:
            t1 = t0 + p.tokens
            a, b = max(start, t0), min(stop, t1)
            if a < b:
                out.append(_slice(p, a - t0, b - t0))
            t0 = t1
        return Segments(out)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return torch.cat([p.dequantize(dtype) for p in self.parts], 1)
        start = 0
        for p in self.parts:
            p.dequantize(dtype, out=out[:, start : start + p.tokens])
            start += p.tokens
        return out


@dataclass
class RowSplit:
    """One block whose rows (batch x kv-heads) are stored at different widths: ``widths`` (uint8, one
    per row, held and counted) says which, each part holds the rows of one width."""

    widths: torch.Tensor  # uint8 (rows,)
    parts: list  # one encoding per distinct width, ascending, of the rows with that width
    dim: int

    @property
    def tokens(self) -> int:
        return self.parts[0].tokens

    @property
    def codes(self) -> torch.Tensor:
        return self.parts[0].codes

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.parts)

    @property
    def nbytes(self) -> int:
        return self.widths.nbytes + sum(p.nbytes for p in self.parts)

    def tensors(self) -> list[torch.Tensor]:
        return [self.widths] + [t for p in self.parts for t in p.tensors()]

    def _rows(self) -> list[torch.Tensor]:
        return [(self.widths == b).nonzero().squeeze(1) for b in torch.unique(self.widths).tolist()]

    def append(self, other):
        if _layout(other) == _layout(self):
            return RowSplit(self.widths, [a.append(b) for a, b in zip(self.parts, other.parts)], self.dim)
        return Segments([self]).append(other)

    def slice_tokens(self, start: int, stop: int) -> "RowSplit":
        return RowSplit(self.widths, [_slice(p, start, stop) for p in self.parts], self.dim)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(self.widths.numel(), self.tokens, self.dim, dtype=dtype, device=self.codes.device)
        for rows, p in zip(self._rows(), self.parts):
            out.index_copy_(0, rows.to(out.device), p.dequantize(dtype))
        return out


def _slice(part, start: int, stop: int):
    """``part.slice_tokens`` where the ends fall on its group boundaries, else a covering reading slice."""
    u = getattr(part, "unit_tokens", 1)
    if isinstance(part, (Segments, RowSplit)) or (start % u == 0 and (stop % u == 0 or stop == part.tokens)):
        return part.slice_tokens(start, stop)
    return _covering_slice(part, start, stop)


def split_rows(widths: list[int], encode, dim: int) -> Any:
    """``encode(rows, bits)`` for each distinct width of ``widths`` (one per row); a :class:`RowSplit`
    unless every row has the same width."""
    distinct = sorted(set(widths))
    if len(distinct) == 1:
        return encode(None, distinct[0])
    w = torch.tensor(widths, dtype=torch.uint8)
    parts = [encode((w == b).nonzero().squeeze(1), b) for b in distinct]
    if all(isinstance(p, Rotated) for p in parts):  # one rotation outside: readers move it to the query
        return Rotated(RowSplit(w, [p.inner for p in parts], dim))
    return RowSplit(w, parts, dim)


def _prepare(x: torch.Tensor, exclude: torch.Tensor | None, rotated: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` (rotated if asked) and the mask of values to leave out of the group statistics."""
    x = x.float()
    if exclude is None or not bool(exclude.any()):
        return (x @ hadamard_on(x.shape[-1], x.device, x.dtype) if rotated else x), None
    if not rotated:
        return x, exclude
    keep = ~exclude
    mean = (x * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
    x = torch.where(exclude, mean, x)  # stored elsewhere: overwritten on read, so make it harmless
    whole = exclude.all(-1, keepdim=True)  # whole tokens (sinks) stay out of the statistics
    return x @ hadamard_on(x.shape[-1], x.device, x.dtype), (whole.expand_as(x) if bool(whole.any()) else None)


def quantize_lloyd_max(
    x: torch.Tensor,
    bits: int,
    axis: str,
    group_size: int,
    scale: str = "rms",
    scale_format: str = "log8",
    zero: bool = False,
    rotated: bool = True,
    exclude: torch.Tensor | None = None,
    reconstruction: str = "centroid",
) -> LloydMaxQuantized:
    """Quantize ``x`` (rows, tokens, dim) group-wise onto the Lloyd-Max codebook of ``bits``."""
    dim = x.shape[-1]
    x, leave_out = _prepare(x, exclude, rotated)
    g = _as_units(x, axis, group_size)
    r = 2 if axis == "channel" else 3
    if leave_out is None:
        w, n = None, g.shape[r]
    else:
        w = (~_as_units(leave_out, axis, group_size)).to(g.dtype)
        n = w.sum(r, keepdim=True).clamp_min(1)
    masked = (lambda t: t) if w is None else (lambda t: t * w)  # noqa: E731
    if zero:
        z = (masked(g).sum(r, keepdim=True) / n).half()
        d = g - z.float()
    else:
        z = g.new_zeros(0, dtype=torch.float16)
        d = g
    levels = lloyd_max(bits).to(g.device)
    cuts = thresholds(bits).to(g.device)
    rms = (masked(d * d).sum(r, keepdim=True) / n).sqrt()
    if scale == "absmax":
        s_stored = encode_scale(masked(d.abs()).amax(r, keepdim=True) / levels[-1], scale_format)
    elif scale == "rms":
        s_stored = encode_scale(rms, scale_format)
    else:  # mse: the candidate scale with the smallest squared error of the group
        best_err, s_stored = None, None
        for m in _MSE_GRID:
            cand = encode_scale(rms * m, scale_format)
            s = decode_scale(cand)
            err = masked((d - levels[torch.bucketize(d / s, cuts)] * s).square()).sum(r, keepdim=True)
            if best_err is None:
                best_err, s_stored = err, cand
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                s_stored = torch.where(better, cand, s_stored)
    codes = torch.bucketize(d / decode_scale(s_stored), cuts)
    if reconstruction == "unbiased":  # E[x xhat] = E[x^2] for a Gaussian group: no shrinkage of inner products
        s_stored = encode_scale(decode_scale(s_stored) / (1 - gaussian_mse(bits)), scale_format)
    elif reconstruction == "projection":  # per group: <d, dhat> = <d, d>
        c = levels[codes]
        dc = masked(d * c).sum(r, keepdim=True)
        s_rec = masked(d * d).sum(r, keepdim=True) / dc.clamp_min(1e-30)
        s_stored = torch.where(dc > 0, encode_scale(s_rec, scale_format), s_stored)
    codes = codes.to(torch.uint8)
    block = LloydMaxQuantized(pack(codes.flatten(2), bits), s_stored, z, bits, axis, group_size, dim)
    return Rotated(block) if rotated else block


def encode_minmax(
    x: torch.Tensor, bits: int, axis: str, group_size: int, rotated: bool = True, exclude: torch.Tensor | None = None
):
    """Min-max groups (:func:`streamkv.kv.quantization.quantize`: an fp16 scale and zero per group) of the
    rotated ``x``, with the same handling of values stored elsewhere as :func:`quantize_lloyd_max`."""
    x, leave_out = _prepare(x, exclude, rotated)
    block = Segments([quantize(x, bits, axis, group_size, leave_out)])  # appends across widths like the codebook groups
    return Rotated(block) if rotated else block


def _layout(part) -> tuple:
    """Parts with equal layouts concatenate along tokens."""
    if isinstance(part, Rotated):
        return ("rotated", _layout(part.inner))
    if isinstance(part, Segments) and len(part.parts) == 1:
        return _layout(part.parts[0])
    if isinstance(part, RowSplit):
        return ("rows", tuple(part.widths.tolist()), tuple(_layout(p) for p in part.parts))
    if isinstance(part, LloydMaxQuantized):
        return ("lloyd_max", part.bits, part.axis, part.group_size, part.dim, part.scale.dtype, part.zero.numel() > 0)
    return (type(part).__name__, part.bits, part.axis, part.group_size, part.dim)


@dataclass
class LloydMaxQuantizer(GroupedQuantizer):
    """b-bit Lloyd-Max codebook groups after a Hadamard rotation (see the module docstring).

    Keys per channel over ``key_group_size`` tokens before RoPE, values per token over
    ``value_group_size`` channels (0 = the whole head). ``budget_bits`` (average stored bits per
    element, everything counted) turns on calibration-free mixed precision; ``key_bits`` and
    ``value_bits`` are then where every layer starts.
    """

    key_bits: int = 4
    value_bits: int = 4
    key_axis: str = "channel"
    value_axis: str = "token"
    key_group_size: int = 128
    value_group_size: int = 0
    pre_rope: bool = True
    residual_length: int = 0
    rotate_keys: bool = True
    rotate_values: bool = True
    key_codebook: str = "minmax"
    value_codebook: str = "lloyd_max"
    scale: str = "mse"
    scale_format: str = "log8"
    key_zero: str = "mean"
    value_zero: str = "none"
    reconstruction: str = "projection"
    budget_bits: Optional[float] = None
    widths: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    granularity: str = "head"
    kind_weight: float = 8.0
    sensitivity_power: float = 2.0

    def __post_init__(self) -> None:
        check_bits("quantizer.key_bits", self.key_bits)
        check_bits("quantizer.value_bits", self.value_bits)
        self._check_fields(LLOYD_MAX_BITS)
        one_of("quantizer.key_codebook", self.key_codebook, CODEBOOKS)
        one_of("quantizer.value_codebook", self.value_codebook, CODEBOOKS)
        one_of("quantizer.scale", self.scale, SCALES)
        one_of("quantizer.scale_format", self.scale_format, SCALE_FORMATS)
        one_of("quantizer.reconstruction", self.reconstruction, RECONSTRUCTIONS)
        one_of("quantizer.key_zero", self.key_zero, ZEROS)
        one_of("quantizer.value_zero", self.value_zero, ZEROS)
        for b in self.widths:
            check_bits("quantizer.widths", b)
        one_of("quantizer.granularity", self.granularity, GRANULARITIES)
        if self.budget_bits is not None:
            from ..allocation import check_budget

            check_budget(self)

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        super().check_shapes(head_dim, chunk_size)
        if self.rotate_keys or self.rotate_values:
            check(is_power_of_two(head_dim), f"quantizer.rotate_*: head_dim={head_dim} is not a power of two")
        if self.budget_bits is not None:
            from ..allocation import check_budget

            check_budget(self, head_dim)

    def _encode(self, kind: str, x: torch.Tensor, exclude, bits: int):
        axis = getattr(self, f"{kind}_axis")
        if getattr(self, f"{kind}_codebook") == "minmax":
            g = group_for(getattr(self, f"{kind}_group_size"), axis, x)
            return encode_minmax(x, bits, axis, g, getattr(self, f"rotate_{kind}s"), exclude)
        return quantize_lloyd_max(
            x, bits, axis, group_for(getattr(self, f"{kind}_group_size"), axis, x), self.scale, self.scale_format,
            getattr(self, f"{kind}_zero") == "mean", getattr(self, f"rotate_{kind}s"), exclude, self.reconstruction,
        )

    def encode_keys(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0):
        return self._encode("key", x, exclude, self.key_bits)

    def encode_values(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0):
        return self._encode("value", x, exclude, self.value_bits)

    def for_stream(self, num_layers: int) -> Any:
        """What one cache (one sequence) encodes with (:class:`~streamkv.kv.contracts.PerSequence`): this
        quantizer, or with ``budget_bits`` a per-sequence allocator that picks the widths online."""
        if self.budget_bits is None:
            return self
        from ..allocation import BudgetAllocator

        return BudgetAllocator(self, num_layers)

    def describe(self) -> str:
        bits = f"budget {self.budget_bits}" if self.budget_bits is not None else f"{self.key_bits}/{self.value_bits}"
        return f"lloyd-max {bits} K:{self.key_axis}/{self.key_group_size} V:{self.value_axis}/{self.value_group_size} scale:{self.scale}/{self.scale_format}"
