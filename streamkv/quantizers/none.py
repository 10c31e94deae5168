"""The uncompressed baseline: keys and values stay as the model computed them."""

from dataclasses import dataclass

from ..registry import register


@register("quantizer", "none")
@dataclass
class NoQuantizer:
    """No compression at all: with it the cache behaves like transformers' ``DynamicCache``.

    Sinks and outliers only make sense against compressed neighbours, so they are switched off too.
    """

    enabled = False
    pre_rope = False
    residual_length = 0
    token_block = 1

    def describe(self) -> str:
        return "fp (uncompressed)"
