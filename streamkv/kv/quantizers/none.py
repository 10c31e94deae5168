"""The uncompressed baseline: keys and values stay as the model computed them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NoQuantizer:
    """No compression at all: with it the cache behaves like transformers' ``DynamicCache``.

    Sinks and outliers only make sense against compressed neighbours, so they are switched off too.
    """

    enabled = False
    pre_rope = False
    residual_length = 0
    token_block = 1

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        pass

    def encode_keys(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0):
        raise RuntimeError("the uncompressed cache never encodes")

    encode_values = encode_keys

    def describe(self) -> str:
        return "fp (uncompressed)"
