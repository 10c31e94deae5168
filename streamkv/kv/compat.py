"""Every private API of torch and transformers the engine (and the lab's peers) use, in one place,
each behind a version check with a public fallback, so an upgrade that moves one fails here, loudly
and in one place, or falls back to the public path.
"""

from __future__ import annotations

from typing import Any

import torch

_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, is_causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """SDPA's output and its log-sum-exp per query (batch, heads, q_len), which merging attention over
    several key ranges needs; None where only the public SDPA (which returns no log-sum-exp) can run.

    torch's public ``scaled_dot_product_attention`` does not return the log-sum-exp; its CPU flash
    kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, torch >= 2.2) does, for float32 and
    bfloat16 CPU tensors."""
    if _flash_cpu is None or query.device.type != "cpu" or query.dtype not in (torch.float32, torch.bfloat16):
        return None
    out, lse = _flash_cpu(query, key, value, is_causal=is_causal, scale=scale)[:2]
    return out, lse


def has_attention_with_lse(query: torch.Tensor) -> bool:
    """Whether :func:`attention_with_lse` serves tensors like ``query``."""
    return _flash_cpu is not None and query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16)


def quantized_cache_parts(layer: Any) -> tuple[Any, Any]:
    """The quantized keys and values a transformers ``QuantizedLayer`` holds (its private
    ``_quantized_keys`` / ``_quantized_values``, transformers 4.45 to 5.x); a one-line error naming the
    transformers version where they moved."""
    try:
        return layer._quantized_keys, layer._quantized_values
    except AttributeError:
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__}: QuantizedLayer no longer holds _quantized_keys/_quantized_values; "
            "the hf_* peers' byte counts need updating (streamkv/kv/compat.py)"
        ) from None
