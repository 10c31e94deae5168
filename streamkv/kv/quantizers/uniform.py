"""Uniform (min-max, asymmetric) integer groups with packed storage: the seed's normal tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check
from ..storage.packed import quantize
from ..storage.rotated import Rotated
from ..transforms.hadamard import is_power_of_two, rotate
from .base import GroupedQuantizer


@dataclass
class UniformQuantizer(GroupedQuantizer):
    """b-bit groups with an fp16 scale and zero each.

    Keys default to per-channel groups along tokens and values to per-token groups along the head
    dimension (KIVI, KVQuant): key outliers live in fixed channels, value errors average out per token.
    ``pre_rope`` stores keys before the rotary embedding, where channels are smoother (KVQuant).
    ``rotate_keys``/``rotate_values`` Hadamard-rotate the head dimension before quantizing (QuaRot):
    values that go to sparse outlier storage are zeroed first, then the rest is rotated and grouped.
    """

    rotate_keys: bool = False
    rotate_values: bool = False

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        super().check_shapes(head_dim, chunk_size)
        if self.rotate_keys or self.rotate_values:
            check(is_power_of_two(head_dim), f"quantizer.rotate_*: head_dim={head_dim} is not a power of two")

    def encode(self, kind: str, x: torch.Tensor, exclude: torch.Tensor | None, bits: int):
        axis, g = getattr(self, f"{kind}_axis"), self.group_size(kind, x.shape[-1])
        if not getattr(self, f"rotate_{kind}s"):
            return quantize(x, bits, axis, g, exclude)
        if exclude is not None:
            x = x.masked_fill(exclude, 0.0)  # stored elsewhere (sparse outliers, sinks): overwritten on read
        return Rotated(quantize(rotate(x), bits, axis, g))

    def describe(self) -> str:
        return f"int{self.key_bits}/{self.value_bits} K:{self.key_axis}/{self.key_group_size} V:{self.value_axis}/{self.value_group_size}"
