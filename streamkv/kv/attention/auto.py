"""Which backend reads a forward when none is named (``attention=auto``), decided here once.

On a CUDA GPU with Triton: the Triton kernels. On the CPU (:class:`SplitBackend`), by the size of the
forward, as measured: a decoding step has a few queries per KV head, and reading the packed history
once in the compiled kernel is what it costs (materialising it would cost more); a prefill chunk has
hundreds, the history is read once either way, and SDPA's blocked kernel on the dense copy beats any
score matrix built per block. Elsewhere: the fused tensor path.

Without padding, a chunk sees its whole history and its own tokens causally, so it needs no mask:
the history is attended unmasked (the GQA queries of a KV head stacked as one longer query, so no
key is repeated) and the own tokens with SDPA's causal mode, and the two are merged by their
log-sum-exp, exactly (flash-decoding's merge). The masked single call it replaces reads and adds a
(chunk x context) mask and computes every masked score.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..compat import attention_with_lse, has_attention_with_lse
from .backend import AttentionBackend
from .fused import FusedBackend
from .view import LayerView


@dataclass
class AutoBackend:
    """The fastest backend that meets the quality target on the model's device (see the module docstring)."""

    name = "auto"

    def resolve(self, device: torch.device) -> AttentionBackend:
        if device.type == "cuda":
            from .triton import TritonBackend

            if TritonBackend.importable():
                return TritonBackend()
        if device.type == "cpu":
            return SplitBackend()
        return FusedBackend()


def resolve(backend, device) -> AttentionBackend:
    """The concrete backend for ``device`` (``auto`` resolved)."""
    return backend.resolve(device) if isinstance(backend, AutoBackend) else backend


@dataclass
class SplitBackend:
    """Decoding steps (at most ``decode.decode_queries`` queries per KV head) read by ``decode``;
    prefill chunks by the dense read (the reference) and SDPA."""

    decode: FusedBackend = field(default_factory=FusedBackend)

    name = "fused+dense"
    materializes = False

    def check(self, compression, device: torch.device) -> None:
        self.decode.check(compression, device)

    def attend(self, view: LayerView, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        if view.is_decoding(query, self.decode.decode_queries):
            return self.decode.attend(view, query, mask, scaling)
        if _unmasked(view, query, mask):
            return _history_then_own(view, query, scaling)
        keys, values = view.dense()
        n, ql = keys.shape[2], query.shape[2]
        if mask is None:  # causal among the chunk's own tokens, the whole history visible
            mask = torch.arange(n, device=query.device)[None, :] <= torch.arange(n - ql, n, device=query.device)[:, None]
        else:
            mask = mask[..., -n:]
        out = torch.nn.functional.scaled_dot_product_attention(
            query, keys.to(query.dtype), values.to(query.dtype), attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != view.heads
        )
        return out.transpose(1, 2)


def _unmasked(view: LayerView, query: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the chunk sees its whole history and its own tokens causally (no padding, no window),
    and the log-sum-exp that merging needs is available."""
    if not has_attention_with_lse(query):
        return False
    if mask is None:
        return True
    ql, n = query.shape[2], view.history - view.first
    key = (n, ql)  # every layer of a forward gets the same mask (never changed in place): test it once
    held = mask.__dict__.get("_streamkv_unmasked")
    if held is not None and held[0] == key:
        return held[1]
    cols = mask[..., -(n + ql):]  # the held history and the own tokens: the mask's last columns
    ok = cols.shape[-1] == n + ql and bool(cols[..., :n].all()) and bool(
        torch.equal(cols[..., n:], torch.ones(ql, ql, dtype=torch.bool, device=mask.device).tril().expand_as(cols[..., n:])))
    mask.__dict__["_streamkv_unmasked"] = (key, ok)
    return ok


def _history_then_own(view: LayerView, query: torch.Tensor, scaling: float) -> torch.Tensor:
    gq = view.grouping(query)
    b, hq, ql, d, h, g = gq.batch, gq.q_heads, gq.q_len, gq.dim, gq.heads, gq.group
    keys, values = view.dense(own=False)
    stacked = query.reshape(b, h, g * ql, d)  # the queries of a KV head as one: no key repeated
    o1, l1 = attention_with_lse(stacked, keys.to(query.dtype), values.to(query.dtype), scaling)
    own_k = view.keys.reshape(b, h, ql, d).repeat_interleave(g, 1).to(query.dtype)
    own_v = view.values.reshape(b, h, ql, d).repeat_interleave(g, 1).to(query.dtype)
    o2, l2 = attention_with_lse(query, own_k, own_v, scaling, is_causal=True)
    # the two parts weighted w1 / (w1 + w2) = sigmoid(l1 - l2) and w2 / (w1 + w2): one lerp over the
    # outputs (the exp-max-divide spelling broadcasts (.., 1) weights over them, many times slower on the CPU)
    w = torch.sigmoid(l1.reshape(b, hq, ql, 1).float() - l2.unsqueeze(-1).float())
    out = torch.lerp(o2.float(), o1.reshape(b, hq, ql, d).float(), w)
    return out.to(query.dtype).transpose(1, 2)
