"""Lloyd-Max codebook groups after a Hadamard rotation: data-oblivious, no calibration, lean metadata.

Each group (keys: one channel over ``key_group_size`` tokens, before RoPE; values: ``value_group_size``
channels of one token) of the rotated head dimension is stored as b-bit indices into the fixed
Lloyd-Max codebook of N(0, 1), scaled by one statistic of the group and, where it pays, shifted by
the group's mean (the codec: :mod:`streamkv.kv.storage.codebook`):

* ``scale``: ``rms``, ``absmax`` or ``mse`` (see :func:`~streamkv.kv.storage.codebook.quantize_lloyd_max`);
* ``scale_format``: ``fp16``, or ``log8``: one byte per group, half the bytes of fp16;
* ``key_zero`` / ``value_zero``: ``mean`` stores the group's mean as fp16 and codes the deviation
  from it (keys, whose channels carry a steady offset), ``none`` codes the values as they are
  (rotated values are centred);
* ``key_codebook`` / ``value_codebook``: ``lloyd_max``, or ``minmax`` (integer groups of the same
  rotated values, an fp16 scale and zero each).

``budget_bits`` switches on mixed precision: see :mod:`streamkv.kv.quantizers.budget`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from ..errors import check, one_of
from ..storage.codebook import RECONSTRUCTIONS, SCALE_FORMATS, SCALES, quantize_lloyd_max, quantize_minmax
from ..storage.levels import LLOYD_MAX_BITS, check_bits
from ..transforms.hadamard import is_power_of_two
from .base import GroupedQuantizer
from .budget import BudgetAllocator, check_budget

ZEROS = ("mean", "none")
CODEBOOKS = ("lloyd_max", "minmax")
GRANULARITIES = ("layer", "head")


@dataclass
class LloydMaxQuantizer(GroupedQuantizer):
    """b-bit Lloyd-Max codebook groups after a Hadamard rotation (see the module docstring).

    Keys per channel over ``key_group_size`` tokens before RoPE, values per token over
    ``value_group_size`` channels (0 = the whole head). ``budget_bits`` (average stored bits per
    element, everything counted) turns on calibration-free mixed precision; ``key_bits`` and
    ``value_bits`` are then where every layer starts.
    """

    value_group_size: int = 0
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

    WIDTHS: ClassVar[tuple[int, ...]] = LLOYD_MAX_BITS

    def __post_init__(self) -> None:
        check_bits("quantizer.key_bits", self.key_bits)
        check_bits("quantizer.value_bits", self.value_bits)
        super().__post_init__()
        for kind in ("key", "value"):
            one_of(f"quantizer.{kind}_codebook", getattr(self, f"{kind}_codebook"), CODEBOOKS)
            one_of(f"quantizer.{kind}_zero", getattr(self, f"{kind}_zero"), ZEROS)
        one_of("quantizer.scale", self.scale, SCALES)
        one_of("quantizer.scale_format", self.scale_format, SCALE_FORMATS)
        one_of("quantizer.reconstruction", self.reconstruction, RECONSTRUCTIONS)
        for b in self.widths:
            check_bits("quantizer.widths", b)
        one_of("quantizer.granularity", self.granularity, GRANULARITIES)
        if self.budget_bits is not None:
            check_budget(self)

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        super().check_shapes(head_dim, chunk_size)
        if self.rotate_keys or self.rotate_values:
            check(is_power_of_two(head_dim), f"quantizer.rotate_*: head_dim={head_dim} is not a power of two")
        if self.budget_bits is not None:
            check_budget(self, head_dim)

    def encode(self, kind: str, x: torch.Tensor, exclude: torch.Tensor | None, bits: int):
        axis, g, rotated = getattr(self, f"{kind}_axis"), self.group_size(kind, x.shape[-1]), getattr(self, f"rotate_{kind}s")
        if getattr(self, f"{kind}_codebook") == "minmax":
            return quantize_minmax(x, bits, axis, g, rotated, exclude)
        zero = getattr(self, f"{kind}_zero") == "mean"
        return quantize_lloyd_max(x, bits, axis, g, self.scale, self.scale_format, zero, rotated, exclude, self.reconstruction)

    def for_stream(self, num_layers: int) -> Any:
        """What one cache (one sequence) encodes with (:class:`~streamkv.kv.contracts.PerSequence`): this
        quantizer (told the layers, for edge layers), or with ``budget_bits`` a per-sequence allocator
        that picks the widths online."""
        return super().for_stream(num_layers) if self.budget_bits is None else BudgetAllocator(self, num_layers)

    def describe(self) -> str:
        bits = f"budget {self.budget_bits}" if self.budget_bits is not None else f"{self.key_bits}/{self.value_bits}"
        return f"lloyd-max {bits} K:{self.key_axis}/{self.key_group_size} V:{self.value_axis}/{self.value_group_size} scale:{self.scale}/{self.scale_format}"
