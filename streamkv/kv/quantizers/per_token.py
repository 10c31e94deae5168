"""Naive per-token integer quantization: the plain baseline of the KV-quantization papers.

Keys and values alike get one fp16 scale and zero per token and head (a group spanning the whole
head dimension), after RoPE. KVQuant's Table 18 calls it "int4 per-token"; it is what a cache gets
without the per-channel key trick, sinks or outliers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import check, one_of
from ..quantization import AXES, Quantized, quantize

BITS = (2, 3, 4, 8)


def group_for(group_size: int, axis: str, x: torch.Tensor) -> int:
    """``group_size``, where 0 along the head dimension (``axis="token"``) means the whole head."""
    return x.shape[-1] if group_size == 0 and axis == "token" else group_size


class GroupedQuantizer:
    """What the b-bit group quantizers here share with ``uniform``: group geometry and its checks.

    A per-token group size of 0 means the whole head dimension. Subclasses are dataclasses with the
    fields ``key_bits, value_bits, key_axis, value_axis, key_group_size, value_group_size, pre_rope,
    residual_length``, read by the compressed cache.
    """

    enabled = True

    @property
    def token_block(self) -> int:
        """Tokens that must gather before keys and values can be compressed together."""
        unit = lambda axis, g: g if axis == "channel" else 1  # noqa: E731
        return math.lcm(unit(self.key_axis, self.key_group_size), unit(self.value_axis, self.value_group_size))

    def _check_fields(self, bits: tuple[int, ...]) -> None:
        one_of("quantizer.key_bits", self.key_bits, bits)
        one_of("quantizer.value_bits", self.value_bits, bits)
        one_of("quantizer.key_axis", self.key_axis, AXES)
        one_of("quantizer.value_axis", self.value_axis, AXES)
        for kind in ("key", "value"):
            axis, g = getattr(self, f"{kind}_axis"), getattr(self, f"{kind}_group_size")
            check(g >= 1 or (g == 0 and axis == "token"), f"quantizer.{kind}_group_size={g} must be >= 1 (0 = head_dim, per-token groups only)")
        check(self.residual_length >= 0, f"quantizer.residual_length={self.residual_length} must be >= 0")

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        for kind in ("key", "value"):
            axis, g = getattr(self, f"{kind}_axis"), getattr(self, f"{kind}_group_size")
            if axis == "token" and g:
                check(head_dim % g == 0, f"quantizer.{kind}_group_size={g} does not divide head_dim={head_dim}")
        if chunk_size is not None:
            check(
                chunk_size >= self.token_block,
                f"chunk_size={chunk_size} is smaller than a key group ({self.token_block} tokens); "
                f"use chunk_size >= {self.token_block} or a smaller quantizer.key_group_size",
            )


@dataclass
class IntPerTokenQuantizer(GroupedQuantizer):
    """b-bit min-max groups along the head dimension for keys and values (group 0 = the whole head)."""

    key_bits: int = 4
    value_bits: int = 4
    key_axis: str = "token"
    value_axis: str = "token"
    key_group_size: int = 0
    value_group_size: int = 0
    pre_rope: bool = False
    residual_length: int = 0

    def __post_init__(self) -> None:
        self._check_fields(BITS)

    def encode_keys(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0) -> Quantized:
        return quantize(x, self.key_bits, self.key_axis, group_for(self.key_group_size, self.key_axis, x), exclude)

    def encode_values(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0) -> Quantized:
        return quantize(x, self.value_bits, self.value_axis, group_for(self.value_group_size, self.value_axis, x), exclude)

    def describe(self) -> str:
        return f"int{self.key_bits}/{self.value_bits} per-token"
