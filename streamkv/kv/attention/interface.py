"""The one attention function the model calls, registered with transformers' ``AttentionInterface``,
and the typed carrier that brings it a compressed layer's view.

A compressed layer's ``update`` cannot return its history as dense keys (that is what it avoids), so
it returns this forward's own keys as a :class:`HistoryKeys`: a tensor that carries the layer's
:class:`~streamkv.kv.attention.view.LayerView` (kept beside the tensor, not on the keys the view
holds, so no reference cycle runs through torch's C++ side and a dropped cache is freed at once).
Gemma-4's shared-KV layers pass it on as they pass keys. Any other attention function would silently
attend to the current chunk only; a :class:`HistoryKeys` refuses every tensor operation instead, in
one line naming the layer and the fix.

``streamkv`` attends with the view's backend when its keys carry a history, and with transformers'
own SDPA otherwise (dense K/V from the ``dense`` backend, ``DynamicCache``, no cache, or no history
yet), so one model serves every cache. Its masks are SDPA's. No model class is patched:
:func:`use_on` switches the model's attention implementation.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import ConfigError
from .view import LayerView

NAME = "streamkv"


class HistoryKeys(torch.Tensor):
    """This forward's own keys (the same storage), carrying the layer's view for :func:`streamkv_attention`."""

    view: LayerView
    plain: torch.Tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.size, torch.Tensor.dim) or getattr(func, "__name__", None) == "__get__":  # shape, dtype, ...
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        carrier = next(a for a in args if isinstance(a, HistoryKeys))
        raise ConfigError(
            f"layer {carrier.view.layer} keeps its history compressed and only the {NAME!r} attention reads it, "
            f"but the model ran {getattr(func, '__name__', func)} on its keys (another attn_implementation); "
            f"build the cache with CompressedCache.for_model(model, ...) or call streamkv.kv.attention.interface.use_on(model)"
        )


def carry(keys: torch.Tensor, view: LayerView) -> HistoryKeys:
    """``keys`` (this forward's own) as a :class:`HistoryKeys` carrying ``view``."""
    out = keys.as_subclass(HistoryKeys)
    out.view, out.plain = view, keys
    return out


def streamkv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    view = key.view if isinstance(key, HistoryKeys) else None
    if view is None or not view.segments:  # dense K/V, or no history yet: the chunk's own tokens are exact
        key = key.plain if isinstance(key, HistoryKeys) else key
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
