"""Decoding and prefill chunks read by different backends, as the measurements say (``auto`` on the CPU).

A decoding step has a few queries per KV head: reading the packed history once in the fused kernel is
what it costs, and materialising the history would cost more. A prefill chunk has hundreds: the
history is read once either way, and SDPA's blocked kernel on the dense copy beats any score matrix
built per block (measured on the embedded model: 0.95x vs 0.56x DynamicCache's prefill speed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..segments import LayerView
from .fused import FusedBackend


@dataclass
class SplitBackend:
    """``decode`` serves forwards of at most ``decode.decode_queries`` queries per KV head; longer
    chunks get the dense read (the reference) and SDPA."""

    decode: FusedBackend = field(default_factory=FusedBackend)

    name = "fused+dense"
    materializes = False

    def check(self, compression, device: torch.device) -> None:
        self.decode.check(compression, device)

    def attend(self, view: LayerView, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        b, hq, ql, d = query.shape
        if hq // view.heads * ql <= self.decode.decode_queries:
            return self.decode.attend(view, query, mask, scaling)
        keys, values = view.dense()
        n = keys.shape[2]
        if mask is None:  # causal among the chunk's own tokens, the whole history visible
            mask = torch.arange(n, device=query.device)[None, :] <= torch.arange(n - ql, n, device=query.device)[:, None]
        else:
            mask = mask[..., -n:]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys.to(query.dtype), values.to(query.dtype), attn_mask=mask, scale=scaling, enable_gqa=hq != view.heads
        )
        return out.transpose(1, 2)
