"""Naive per-token integer quantization: the plain baseline of the KV-quantization papers.

Keys and values alike get one fp16 scale and zero per token and head (a group spanning the whole
head dimension), after RoPE. KVQuant's Table 18 calls it "int4 per-token"; it is what a cache gets
without the per-channel key trick, sinks or outliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..storage.packed import Quantized, quantize
from .base import GroupedQuantizer


@dataclass
class IntPerTokenQuantizer(GroupedQuantizer):
    """b-bit min-max groups along the head dimension for keys and values (group 0 = the whole head)."""

    key_axis: str = "token"
    key_group_size: int = 0
    value_group_size: int = 0
    pre_rope: bool = False

    def encode(self, kind: str, x: torch.Tensor, exclude: torch.Tensor | None, bits: int) -> Quantized:
        return quantize(x, bits, getattr(self, f"{kind}_axis"), self.group_size(kind, x.shape[-1]), exclude)

    def describe(self) -> str:
        return f"int{self.key_bits}/{self.value_bits} per-token"
