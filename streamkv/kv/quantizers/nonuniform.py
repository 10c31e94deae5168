"""Non-uniform codebook groups (KVQuant's datatype) with really packed codes.

Each group is normalised to [-1, 1] by its own min-max range (an fp16 ``scale`` = half-range and
``zero`` = mid-range, as many bytes as the uniform quantizer), and every value is stored as the
b-bit index of the nearest level of a fixed codebook (:func:`~streamkv.kv.storage.levels.normal_float`:
``nf``, NormalFloat-style, denser near the middle where most keys and values fall; or ``uniform``).
KVQuant calibrates one codebook per layer offline; this one needs no calibration data, so it works
on streaming input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import one_of
from ..storage.codebook import CodebookQuantized, quantize_codebook
from .base import GroupedQuantizer

CODEBOOKS = ("nf", "uniform")


@dataclass
class NonUniformQuantizer(GroupedQuantizer):
    """b-bit codebook groups: keys per channel (pre-RoPE by default), values per token (KVQuant)."""

    value_group_size: int = 0
    codebook: str = "nf"

    WIDTHS: ClassVar[tuple[int, ...]] = (2, 3, 4)

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("quantizer.codebook", self.codebook, CODEBOOKS)

    def encode(self, kind: str, x: torch.Tensor, exclude: torch.Tensor | None, bits: int) -> CodebookQuantized:
        return quantize_codebook(x, bits, getattr(self, f"{kind}_axis"), self.group_size(kind, x.shape[-1]), self.codebook, exclude)

    def describe(self) -> str:
        return f"{self.codebook}{self.key_bits}/{self.value_bits} K:{self.key_axis}/{self.key_group_size} V:{self.value_axis}/{self.value_group_size}"
