"""Uniform (min-max, asymmetric) integer quantization with packed storage: the seed's normal tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import check, one_of
from ..quantization import AXES, Quantized, quantize
from ..rotation import Rotated, is_power_of_two, rotate

BITS = (2, 3, 4, 8)


@dataclass
class UniformQuantizer:
    """b-bit groups with an fp16 scale and zero each.

    Keys default to per-channel groups along tokens and values to per-token groups along the head
    dimension (KIVI, KVQuant): key outliers live in fixed channels, value errors average out per token.
    ``pre_rope`` stores keys before the rotary embedding, where channels are smoother (KVQuant).
    ``residual_length`` keeps that many of the most recent tokens at full precision (KIVI).
    ``rotate_keys``/``rotate_values`` Hadamard-rotate the head dimension before quantizing (QuaRot):
    values that go to sparse outlier storage are zeroed first, then the rest is rotated and grouped.
    """

    key_bits: int = 4
    value_bits: int = 4
    key_axis: str = "channel"
    value_axis: str = "token"
    key_group_size: int = 128
    value_group_size: int = 64
    pre_rope: bool = True
    residual_length: int = 0
    rotate_keys: bool = False
    rotate_values: bool = False

    enabled = True

    def __post_init__(self) -> None:
        one_of("quantizer.key_bits", self.key_bits, BITS)
        one_of("quantizer.value_bits", self.value_bits, BITS)
        one_of("quantizer.key_axis", self.key_axis, AXES)
        one_of("quantizer.value_axis", self.value_axis, AXES)
        for name in ("key_group_size", "value_group_size"):
            check(getattr(self, name) >= 1, f"quantizer.{name}={getattr(self, name)} must be >= 1")
        check(self.residual_length >= 0, f"quantizer.residual_length={self.residual_length} must be >= 0")

    @property
    def token_block(self) -> int:
        """Tokens that must gather before keys and values can be compressed together."""
        unit = lambda axis, g: g if axis == "channel" else 1  # noqa: E731
        return math.lcm(unit(self.key_axis, self.key_group_size), unit(self.value_axis, self.value_group_size))

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        for kind in ("key", "value"):
            axis, g = getattr(self, f"{kind}_axis"), getattr(self, f"{kind}_group_size")
            if axis == "token":
                check(head_dim % g == 0, f"quantizer.{kind}_group_size={g} does not divide head_dim={head_dim}")
        if self.rotate_keys or self.rotate_values:
            check(is_power_of_two(head_dim), f"quantizer.rotate_*: head_dim={head_dim} is not a power of two")
        if chunk_size is not None:
            check(
                chunk_size >= self.token_block,
                f"chunk_size={chunk_size} is smaller than a key group ({self.token_block} tokens); "
                f"use chunk_size >= {self.token_block} or a smaller quantizer.key_group_size",
            )

    def encode_keys(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0):
        return self._encode(x, exclude, self.key_bits, self.key_axis, self.key_group_size, self.rotate_keys)

    def encode_values(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0):
        return self._encode(x, exclude, self.value_bits, self.value_axis, self.value_group_size, self.rotate_values)

    @staticmethod
    def _encode(x, exclude, bits: int, axis: str, group_size: int, rotated: bool):
        if not rotated:
            return quantize(x, bits, axis, group_size, exclude)
        if exclude is not None:
            x = x.masked_fill(exclude, 0.0)  # stored elsewhere (sparse outliers, sinks): overwritten on read
        return Rotated(quantize(rotate(x), bits, axis, group_size))

    def describe(self) -> str:
        return f"int{self.key_bits}/{self.value_bits} K:{self.key_axis}/{self.key_group_size} V:{self.value_axis}/{self.value_group_size}"
