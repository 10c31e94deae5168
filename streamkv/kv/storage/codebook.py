"""Codebook groups: packed codes that index fixed levels, scaled per group (a :class:`Quantized` with a lut).

* :class:`LloydMaxQuantized`: the Lloyd-Max levels of N(0, 1) for the width (a constant of the width,
  regenerated like the Hadamard matrix, not stored), after a Hadamard rotation that makes a group's
  coordinates near-Gaussian; one scale per group (fp16, or one byte ``log8``), a zero only where it
  pays (keys' steady channel offsets). Encoded by :func:`quantize_lloyd_max`.
* :class:`CodebookQuantized`: the NormalFloat-style levels of the ``nonuniform`` quantizer, between the
  group's min and max (held per block and counted). Encoded by :func:`quantize_codebook`.

Values stored elsewhere (sinks, sparse outliers) take no part in a group's statistics: before a
rotation they are replaced by their channel's mean over the block (so they disturb no rotated
coordinate), and whole tokens stored elsewhere (sinks) are left out of the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..transforms.hadamard import hadamard_on
from . import scale_search
from .levels import gaussian_mse, lloyd_max, normal_float, thresholds
from .masks import any_set, kept_mean, whole_tokens
from .packed import MIN_SCALE, Quantized, as_units, group_range, quantize
from .packing import pack
from .rotated import Rotated

SCALES = ("rms", "absmax", "mse")
SCALE_FORMATS = ("fp16", "log8")
RECONSTRUCTIONS = ("centroid", "unbiased", "projection")
_LOG_STEPS, _LOG_BIAS = 8, 160  # log8 scale = 2 ** ((code - _LOG_BIAS) / _LOG_STEPS): steps of 9%, 2**-20 to 2**12
_MSE_GRID = (0.75, 0.82, 0.89, 0.95, 1.0, 1.06, 1.13, 1.22)  # candidate multiples of the RMS (scale=mse)


def encode_scale(s: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "fp16":
        return s.clamp_min(MIN_SCALE).half()
    code = torch.round(torch.log2(s.clamp_min(2.0**-30)) * _LOG_STEPS) + _LOG_BIAS
    return code.clamp_(0, 255).to(torch.uint8)


def decode_scale(stored: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if stored.dtype == torch.uint8:
        return torch.exp2((stored.to(torch.float32) - _LOG_BIAS) / _LOG_STEPS).to(dtype)
    return stored.to(dtype)


@dataclass
class LloydMaxQuantized(Quantized):
    """Codes into the Lloyd-Max levels of ``bits``, times the group's scale (fp16 or log8), plus its
    zero where one is stored."""

    @property
    def lut(self) -> torch.Tensor:
        return lloyd_max(self.bits)

    def scale_values(self, dtype: torch.dtype) -> torch.Tensor:
        return decode_scale(self.scale, dtype)


@dataclass
class CodebookQuantized(Quantized):
    """Codes into ``levels`` (held and counted), scaled by the group's half-range, shifted by its mid-range."""

    levels: torch.Tensor = None  # float32 (2**bits,)

    @property
    def lut(self) -> torch.Tensor:
        return self.levels

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.zero, self.levels]


def quantize_codebook(
    x: torch.Tensor, bits: int, axis: str, group_size: int, kind: str = "nf", exclude: torch.Tensor | None = None
) -> CodebookQuantized:
    """Each group normalised to [-1, 1] by its own range, each value the index of its nearest level of
    :func:`~streamkv.kv.storage.levels.normal_float` ``(bits, kind)``."""
    dim = x.shape[-1]
    g, lo, hi = group_range(x, axis, group_size, exclude)
    scale = ((hi - lo) / 2).clamp_min(MIN_SCALE).half()
    zero = ((hi + lo) / 2).half()
    levels = normal_float(bits, kind).to(x.device, copy=True)  # held (and counted) by the block itself
    u = (g - zero.float()) / scale.float()
    codes = torch.bucketize(u, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)  # the nearest level
    return CodebookQuantized(pack(codes.flatten(2), bits), scale, zero, bits, axis, group_size, dim, levels)


def _prepare(x: torch.Tensor, exclude: torch.Tensor | None, rotated: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` (rotated if asked) and the mask of values to leave out of the group statistics."""
    x = x.float()
    if not any_set(exclude):
        return (x @ hadamard_on(x.shape[-1], x.device, x.dtype) if rotated else x), None
    if not rotated:
        return x, exclude
    x = torch.where(exclude, kept_mean(x, exclude), x)  # stored elsewhere: overwritten on read, so make it harmless
    whole = whole_tokens(exclude)  # whole tokens (sinks) stay out of the statistics
    return x @ hadamard_on(x.shape[-1], x.device, x.dtype), (whole.expand_as(x) if any_set(whole) else None)


@lru_cache(maxsize=1)
def _log8_scales() -> torch.Tensor:
    """Every one-byte scale decoded (the compiled search picks among these)."""
    return decode_scale(torch.arange(256, dtype=torch.int32).to(torch.uint8))


def _stored_scale(d, masked, n, r, levels, cuts, scale: str, scale_format: str) -> torch.Tensor:
    """Each group's stored scale by ``scale`` (the torch reference of :mod:`.scale_search`)."""
    if scale == "absmax":
        return encode_scale(masked(d.abs()).amax(r, keepdim=True) / levels[-1], scale_format)
    rms = (masked(d * d).sum(r, keepdim=True) / n).sqrt()
    if scale == "rms":
        return encode_scale(rms, scale_format)
    best_err, s_stored = None, None  # mse: the candidate scale with the smallest squared error of the group
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
    return s_stored


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
) -> LloydMaxQuantized | Rotated:
    """Quantize ``x`` (rows, tokens, dim) group-wise onto the Lloyd-Max codebook of ``bits``.

    ``scale``: the group statistic the codebook is stretched to (``rms``; ``absmax``: nothing clips;
    ``mse``: the candidate around the RMS with the group's smallest squared error, searched at encode
    time, nothing more stored). ``reconstruction``: ``centroid`` (the levels as they are), ``unbiased``
    (no shrinkage of inner products for a Gaussian group) or ``projection`` (per group, the scale that
    keeps ``<d, d_hat> = <d, d>``)."""
    dim = x.shape[-1]
    x, leave_out = _prepare(x, exclude, rotated)
    g = as_units(x, axis, group_size)
    r = 2 if axis == "channel" else 3
    if leave_out is None:
        w, n = None, g.shape[r]
    else:
        w = (~as_units(leave_out, axis, group_size)).to(g.dtype)
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
    dd = dc = None  # the projection's sums, where the compiled search returns them
    if scale == "mse" and scale_format == "log8" and r == 3 and d.device.type == "cpu" and scale_search.available():
        codes, s_stored, dd, dc = scale_search.search_scales(d, w, levels, cuts, _MSE_GRID, _LOG_STEPS, _LOG_BIAS,
                                                             _log8_scales())
    else:
        s_stored = _stored_scale(d, masked, n, r, levels, cuts, scale, scale_format)
        codes = torch.bucketize(d / decode_scale(s_stored), cuts)
    if reconstruction == "unbiased":  # E[x xhat] = E[x^2] for a Gaussian group: no shrinkage of inner products
        s_stored = encode_scale(decode_scale(s_stored) / (1 - gaussian_mse(bits)), scale_format)
    elif reconstruction == "projection":  # per group: <d, dhat> = <d, d>
        if dc is None:
            dc = masked(d * levels[codes]).sum(r, keepdim=True)
            dd = masked(d * d).sum(r, keepdim=True)
        s_rec = dd / dc.clamp_min(1e-30)
        s_stored = torch.where(dc > 0, encode_scale(s_rec, scale_format), s_stored)
    codes = codes.to(torch.uint8)
    block = LloydMaxQuantized(pack(codes.flatten(2), bits), s_stored, z, bits, axis, group_size, dim)
    return Rotated(block) if rotated else block


def quantize_minmax(
    x: torch.Tensor, bits: int, axis: str, group_size: int, rotated: bool = True, exclude: torch.Tensor | None = None
) -> Quantized | Rotated:
    """Min-max groups (:func:`~streamkv.kv.storage.packed.quantize`: an fp16 scale and zero per group) of
    the rotated ``x``, with the same handling of values stored elsewhere as :func:`quantize_lloyd_max`."""
    x, leave_out = _prepare(x, exclude, rotated)
    block = quantize(x, bits, axis, group_size, leave_out)
    return Rotated(block) if rotated else block
