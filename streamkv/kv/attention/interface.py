"""The one attention function the model calls, registered with transformers' ``AttentionInterface``.

``streamkv`` attends with the cache layer's backend when the keys it receives carry a
:class:`~streamkv.kv.segments.LayerView`, and with transformers' own SDPA otherwise (dense K/V from
the ``dense`` backend, ``DynamicCache``, no cache, or no history yet), so one model serves every cache. Its masks are
SDPA's. No model class is patched: :func:`use_on` switches the model's attention implementation.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..segments import view_of

NAME = "streamkv"


def streamkv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    view = view_of(key)
    if view is None or not view.segments:  # dense K/V, or no history yet: the chunk's own tokens are exact
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = attention_mask if attention_mask is None or attention_mask.dtype == torch.bool else attention_mask == 0
    return view.backend.attend(view, query, mask, scale), None


AttentionInterface.register(NAME, streamkv_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_on(model: torch.nn.Module) -> None:
    """Route ``model``'s attention through :func:`streamkv_attention` (idempotent)."""
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
