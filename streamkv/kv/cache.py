"""The streaming compressed KV cache: a transformers ``Cache`` of :class:`CompressedLayer` stores.

Build it with :meth:`CompressedCache.for_model`, pass it as ``cache=`` to the model's forward (or
``generate``) and feed the prompt in chunks; each layer compresses its keys and values as they
arrive (:mod:`streamkv.kv.layer`), and the chosen attention backend reads them
(:mod:`streamkv.kv.attention`). :meth:`CompressedCache.stats` reports what is really stored.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from transformers.cache_utils import Cache

from .attention import DenseBackend, interface, resolve
from .compression import Compression
from .errors import ConfigError, check
from .layer import CompressedLayer
from .rope import RopeTable

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")


class CompressedCache(Cache):
    """A ``Cache`` whose layers compress keys and values as each prefill chunk arrives.

    Build it with :meth:`for_model`, pass it as ``cache=`` to the model's forward (or ``generate``),
    and feed the prompt in chunks. :meth:`stats` reports what is really stored.
    """

    def __init__(
        self,
        compression: Compression,
        num_layers: int,
        rope: RopeTable | None = None,
        quantize_own_chunk: bool = False,
        backend: Any = None,
    ):
        if compression.enabled and compression.quantizer.pre_rope and rope is None:
            raise ConfigError("quantizer.pre_rope=true needs the model's rotary embedding; build with CompressedCache.for_model")
        self.compression = compression
        self.backend = backend  # None: layers return dense K/V (for a model that attends with plain SDPA)
        layers = [CompressedLayer(compression, i, rope, backend, quantize_own_chunk) for i in range(num_layers)]
        super().__init__(layers=layers)

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, compression: Compression, chunk_size: int | None = None, quantize_own_chunk: bool = False
    ) -> "CompressedCache":
        config = model.config.get_text_config(decoder=True)
        family = getattr(config, "model_type", "?")
        check(
            not compression.enabled or family in SUPPORTED_FAMILIES,
            f"model family {family!r} is not supported by the compressed cache; supported: {list(SUPPORTED_FAMILIES)}",
        )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        compression.check_shapes(head_dim, chunk_size)
        rope = None
        if compression.enabled and compression.quantizer.pre_rope:
            rope = RopeTable(model.get_decoder().rotary_emb)
        device = next(model.parameters()).device
        backend = resolve(compression.attention, device) if compression.enabled else DenseBackend()
        backend.check(compression, device)
        if not backend.materializes:
            interface.use_on(model)
        return cls(compression, config.num_hidden_layers, rope, quantize_own_chunk, backend)

    def stats(self) -> dict[str, Any]:
        """Compression statistics counted from the tensors the cache holds.

        ``avg_*_bits`` = stored bits per element (codes, scales, zeros, sinks, outliers with their
        indices, and the full-precision residual); ratios are against fp16; ``kv_bytes`` is the sum
        of ``nbytes`` of every tensor held.
        """
        layers = [layer.stats() for layer in self.layers if layer.is_initialized]
        total: dict[str, dict[str, float]] = {k: defaultdict(float) for k in ("key", "value")}
        for ls in layers:
            for kind in ("key", "value"):
                for name in ("bytes", "elements", "outliers"):
                    total[kind][name] += ls[kind][name]
                for part, nb in ls[kind]["bytes_by_part"].items():
                    total[kind][f"bytes_{part}"] += nb
        out: dict[str, Any] = {}
        for kind in ("key", "value"):
            t = total[kind]
            elems = max(t["elements"], 1)
            out[f"avg_{kind}_bits"] = 8 * t["bytes"] / elems
            out[f"compression_ratio_{kind}"] = 16 / out[f"avg_{kind}_bits"] if t["bytes"] else 0.0
            out[f"{kind}_outlier_fraction"] = t["outliers"] / elems
        out["avg_bits"] = (out["avg_key_bits"] + out["avg_value_bits"]) / 2
        out["kv_bytes"] = int(total["key"]["bytes"] + total["value"]["bytes"])
        out["kv_bytes_fp16"] = int(2 * (total["key"]["elements"] + total["value"]["elements"]))
        out["compression_ratio"] = out["kv_bytes_fp16"] / out["kv_bytes"] if out["kv_bytes"] else 0.0
        out["bytes_by_part"] = {
            kind: {k[6:]: int(v) for k, v in total[kind].items() if k.startswith("bytes_")} for kind in ("key", "value")
        }
        out["tokens"] = self.layers[0].seen if layers else 0
        out["per_layer"] = [
            {"avg_key_bits": 8 * ls["key"]["bytes"] / max(ls["key"]["elements"], 1),
             "avg_value_bits": 8 * ls["value"]["bytes"] / max(ls["value"]["elements"], 1),
             "key_outliers": ls["key"]["outliers"], "value_outliers": ls["value"]["outliers"]}
            for ls in layers
        ]
        return out

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (what ``kv_bytes`` sums)."""
        out = []
        for layer in self.layers:
            if layer.is_initialized:
                for s in (layer.k, layer.v):
                    for ts in s.parts().values():
                        out.extend(ts)
        return out

