"""Decoding and prefill chunks read by different backends, as the measurements say (``auto`` on the CPU).

A decoding step has a few queries per KV head: reading the packed history once in the fused kernel is
what it costs, and materialising the history would cost more. A prefill chunk has hundreds: the
history is read once either way, and SDPA's blocked kernel on the dense copy beats any score matrix
built per block (measured on the embedded model: 0.95x vs 0.56x DynamicCache's prefill speed).

Without padding, a chunk sees its whole history and its own tokens causally, so it needs no mask:
the history is attended unmasked (the GQA queries of a KV head stacked as one longer query, so no
key is repeated) and the own tokens with SDPA's causal mode, and the two are merged by their
log-sum-exp, exactly (flash-decoding's merge). The masked single call it replaces reads and adds a
(chunk x context) mask and computes every masked score: measured 39.6 vs 32.5 + 4.1 ms of SDPA per
layer for a 512-token chunk at 4096 tokens of history on the embedded model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..segments import LayerView
from .fused import FusedBackend

_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)  # (out, logsumexp)


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
        if _unmasked(view, query, mask):
            return _history_then_own(view, query, scaling)
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


def _unmasked(view: LayerView, query: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the chunk sees its whole history and its own tokens causally (no padding, no window)."""
    if _flash is None or query.device.type != "cpu" or query.dtype not in (torch.float32, torch.bfloat16):
        return False
    if mask is None:
        return True
    ql, n = query.shape[2], view.history - view.first
    cols = mask[..., -(n + ql):]
    if cols.shape[-1] != n + ql or not bool(cols[..., :n].all()):
        return False
    return bool(torch.equal(cols[..., n:], torch.ones(ql, ql, dtype=torch.bool, device=mask.device).tril().expand_as(cols[..., n:])))


def _history_then_own(view: LayerView, query: torch.Tensor, scaling: float) -> torch.Tensor:
    b, hq, ql, d = query.shape
    h = view.heads
    g = hq // h
    keys, values = view.dense(own=False)
    stacked = query.reshape(b, h, g * ql, d)  # the queries of a KV head as one: no key repeated
    o1, l1 = _flash(stacked, keys.to(query.dtype), values.to(query.dtype), scale=scaling)
    own_k = view.keys.reshape(b, h, ql, d).repeat_interleave(g, 1).to(query.dtype)
    own_v = view.values.reshape(b, h, ql, d).repeat_interleave(g, 1).to(query.dtype)
    o2, l2 = _flash(query, own_k, own_v, is_causal=True, scale=scaling)
    l1 = l1.reshape(b, hq, ql, 1).float()
    l2 = l2.unsqueeze(-1).float()
    top = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
    out = (o1.reshape(b, hq, ql, d) * w1 + o2 * w2) / (w1 + w2)
    return out.to(query.dtype).transpose(1, 2)
