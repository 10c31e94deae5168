"""Non-uniform codebook quantization (KVQuant's datatype) with really packed codes.

Each group is normalised to [-1, 1] by its own min-max range (an fp16 ``scale`` = half-range and
``zero`` = mid-range, as many bytes as the uniform quantizer), and every value is stored as the
b-bit index of the nearest level of a fixed codebook of ``2**bits`` levels in [-1, 1]:

* ``nf`` (NormalFloat-style): the quantiles of a standard normal at ``(i + 0.5) / 2**bits``, scaled
  so that the extreme levels are exactly -1 and 1 (the group's min and max stay exact). Levels are
  denser near the middle, where most keys and values fall;
* ``uniform``: evenly spaced levels (the same grid as the ``uniform`` quantizer; for ablations).

KVQuant calibrates one codebook per layer offline (sensitivity-weighted k-means); this one needs no
calibration data, so it works on streaming input. Codes are packed with :mod:`streamkv.packing`;
the codebook is held once per stored tensor and counted in the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import one_of
from ..packing import pack, unpack
from ..quantization import _MIN_SCALE, Quantized, group_range
from .per_token import GroupedQuantizer, group_for

CODEBOOKS = ("nf", "uniform")
NU_BITS = (2, 3, 4)


@lru_cache(maxsize=None)
def codebook(bits: int, kind: str = "nf") -> torch.Tensor:
    """``2**bits`` sorted float32 levels in [-1, 1], both ends included."""
    n = 1 << bits
    if kind == "uniform":
        return torch.linspace(-1.0, 1.0, n)
    q = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    return (q / q[-1]).float()


@dataclass
class CodebookQuantized(Quantized):
    """A :class:`Quantized` whose codes index ``levels`` (scaled by ``scale``, shifted by ``zero``)."""

    levels: torch.Tensor = None  # float32 (2**bits,)

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.levels.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scale, self.zero, self.levels]

    @property
    def lut(self) -> torch.Tensor:
        return self.levels

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        rows, units, _ = self.codes.shape
        a, b = (self.group_size, self.dim) if self.axis == "channel" else (self.dim // self.group_size, self.group_size)
        codes = unpack(self.codes, self.bits, a * b)
        values = self.levels.to(dtype).index_select(0, codes.reshape(-1).to(torch.int32)).view(rows, units, a, b)
        if out is not None:
            torch.addcmul(self.zero.to(dtype), values, self.scale.to(dtype), out=out.view(rows, units, a, b))
            return out
        x = torch.addcmul(self.zero.to(dtype), values, self.scale.to(dtype))
        return x.reshape(rows, units * self.unit_tokens, self.dim)


def quantize_codebook(
    x: torch.Tensor, bits: int, axis: str, group_size: int, kind: str = "nf", exclude: torch.Tensor | None = None
) -> CodebookQuantized:
    """Quantize ``x`` (rows, tokens, dim) group-wise onto :func:`codebook` ``(bits, kind)``.

    ``exclude`` marks values stored elsewhere (outliers, sinks): they take no part in a group's range.
    """
    dim = x.shape[-1]
    g, lo, hi = group_range(x, axis, group_size, exclude)
    scale = ((hi - lo) / 2).clamp_min(_MIN_SCALE).half()
    zero = ((hi + lo) / 2).half()
    levels = codebook(bits, kind).to(x.device)
    u = (g - zero.float()) / scale.float()
    codes = torch.bucketize(u, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)  # the nearest level
    return CodebookQuantized(pack(codes.flatten(2), bits), scale, zero, bits, axis, group_size, dim, levels)


@dataclass
class NonUniformQuantizer(GroupedQuantizer):
    """b-bit codebook groups: keys per channel (pre-RoPE by default), values per token (KVQuant).

    The fields are the ``uniform`` quantizer's, plus ``codebook`` (``nf`` or ``uniform``); a per-token
    group size of 0 means the whole head dimension.
    """

    key_bits: int = 4
    value_bits: int = 4
    key_axis: str = "channel"
    value_axis: str = "token"
    key_group_size: int = 128
    value_group_size: int = 0
    pre_rope: bool = True
    residual_length: int = 0
    codebook: str = "nf"

    def __post_init__(self) -> None:
        self._check_fields(NU_BITS)
        one_of("quantizer.codebook", self.codebook, CODEBOOKS)

    def encode_keys(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0) -> CodebookQuantized:
        g = group_for(self.key_group_size, self.key_axis, x)
        return quantize_codebook(x, self.key_bits, self.key_axis, g, self.codebook, exclude)

    def encode_values(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0) -> CodebookQuantized:
        g = group_for(self.value_group_size, self.value_axis, x)
        return quantize_codebook(x, self.value_bits, self.value_axis, g, self.codebook, exclude)

    def describe(self) -> str:
        return f"{self.codebook}{self.key_bits}/{self.value_bits} K:{self.key_axis}/{self.key_group_size} V:{self.value_axis}/{self.value_group_size}"
