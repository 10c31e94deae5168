"""The streaming compressed KV cache: a transformers ``Cache`` of :class:`CompressedLayer` stores.

Build it with :meth:`CompressedCache.for_model`, pass it as ``cache=`` to the model's forward (or
``generate``) and feed the prompt in chunks; each layer compresses its keys and values as they
arrive (:mod:`streamkv.kv.layer`), and the chosen attention backend reads them
(:mod:`streamkv.kv.attention`). :meth:`CompressedCache.stats` reports what is really stored.

Layers are built from the model facts (:mod:`streamkv.kv.model_facts`), as ``DynamicCache`` builds
them from ``config.layer_types``: full-attention and sliding-window layers are compressed layers
(each with its own RoPE table for pre-RoPE keys, none for a NoPE layer), linear-attention layers are
transformers' own ``LinearAttentionLayer`` (their recurrent state kept exactly as transformers keeps
it), and layers that reuse another layer's KV (Gemma-4) are transformers' ``DummyLayer``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache

from .attention import AutoBackend, DenseBackend, interface, resolve
from .compression import Compression
from .contracts import PerSequence
from .errors import ConfigError, check
from .layer import CompressedLayer
from .model_facts import FULL, LINEAR, SLIDING, ModelFacts, facts_of, rotary_module
from .transforms.rope import RopeTable


class CompressedCache(Cache):
    """A ``Cache`` whose layers compress keys and values as each prefill chunk arrives.

    Build it with :meth:`for_model`, pass it as ``cache=`` to the model's forward (or ``generate``),
    and feed the prompt in chunks. :meth:`stats` reports what is really stored.
    """

    def __init__(
        self,
        compression: Compression,
        num_layers: int | None = None,
        rope: RopeTable | None = None,
        quantize_own_chunk: bool = False,
        backend: Any = None,
        facts: ModelFacts | None = None,
        ropes: dict[int, RopeTable] | None = None,
    ):
        """``facts`` lay the layers out (``ropes``: each rotary layer's table for pre-RoPE keys);
        without them, ``num_layers`` full-attention layers share ``rope``."""
        pre_rope = compression.enabled and compression.quantizer.pre_rope
        if compression.enabled and isinstance(compression.quantizer, PerSequence):  # state of this sequence's own
            n = len(facts.layers) if facts is not None else (num_layers or 0)
            compression = replace(compression, quantizer=compression.quantizer.for_stream(n))
        self.compression = compression
        self.backend = backend  # None: layers return dense K/V (for a model that attends with plain SDPA)
        self.facts = facts
        if facts is None:
            if pre_rope and rope is None:
                raise ConfigError("quantizer.pre_rope=true needs the model's rotary embedding; build with CompressedCache.for_model")
            layers = [CompressedLayer(compression, i, rope, backend, quantize_own_chunk) for i in range(num_layers or 0)]
        else:
            ropes = ropes or {}
            check(not pre_rope or all(lf.index in ropes for lf in facts.kv_layers if lf.rope),
                  "quantizer.pre_rope=true needs each rotary layer's RoPE table; build with CompressedCache.for_model")
            layers = [self._layer(lf, compression, ropes.get(lf.index), backend, quantize_own_chunk) for lf in facts.layers]
        super().__init__(layers=layers)

    @staticmethod
    def _layer(lf, compression, rope, backend, quantize_own_chunk):
        if lf.kind in (FULL, SLIDING):
            return CompressedLayer(compression, lf.index, rope, backend, quantize_own_chunk, window=lf.window)
        # no KV of its own: transformers' layer, holding what transformers holds (a recurrent state, or nothing)
        return DYNAMIC_LAYER_TYPE_MAPPING[lf.layer_type if lf.kind == LINEAR else "dummy"](**dict(lf.cache_kwargs))

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, compression: Compression, chunk_size: int | None = None, quantize_own_chunk: bool = False
    ) -> "CompressedCache":
        facts = facts_of(model)  # an unsupported family or feature fails here, in one line
        compression.check_shapes(facts.head_dims, chunk_size)
        ropes: dict[int, RopeTable] = {}
        if compression.enabled and compression.quantizer.pre_rope:
            dynamic = next((lf for lf in facts.kv_layers if lf.rope and not lf.static_rope), None)
            check(
                dynamic is None,
                f"quantizer.pre_rope=true cannot undo {facts.family}'s {getattr(dynamic, 'rope_type', '')!r} RoPE "
                f"(layer {getattr(dynamic, 'index', '')}: its frequencies change with the sequence length); use quantizer.pre_rope=false",
            )
            rot = rotary_module(model)
            by_key: dict[Any, RopeTable] = {}
            for lf in facts.kv_layers:
                if lf.rope:  # a NoPE layer stores its keys as they are
                    ropes[lf.index] = by_key.setdefault(lf.rope_key, RopeTable(rot, lf.rope_key))
        device = next(model.parameters()).device
        backend = resolve(compression.attention, device) if compression.enabled else DenseBackend()
        if not backend.materializes and facts.attn_softcap:
            check(
                isinstance(compression.attention, AutoBackend),
                f"attention={backend.name} cannot apply {facts.family}'s attention logit soft-capping "
                f"({facts.attn_softcap}); use attention=dense",
            )
            backend = DenseBackend()  # auto: the model's own attention on the dense history
        backend.check(compression, device)
        if not backend.materializes:
            interface.use_on(model)
        return cls(compression, quantize_own_chunk=quantize_own_chunk, backend=backend, facts=facts, ropes=ropes)

    def set_compressing(self, on: bool) -> None:
        """Whether tokens fed from now on are compressed (default) or kept at full precision beside the
        compressed history: long-context evaluation compresses a context, then asks its question
        uncompressed (kvpress's protocol). Tokens already held keep their form."""
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                layer.compressing = on

    def stats(self) -> dict[str, Any]:
        """Compression statistics counted from the tensors the cache holds.

        ``avg_*_bits`` = stored bits per element (codes, scales, zeros, sinks, outliers with their
        indices, and the full-precision residual) of the tokens held; ratios are against fp16;
        ``kv_bytes`` is the sum of ``nbytes`` of every tensor held, ``kv_bytes_by_layer_type`` splits
        it into full-attention and sliding-window layers (a sliding layer holds its window and the
        group it is in); ``state_bytes`` are linear-attention layers' recurrent and conv states
        (transformers' own tensors, not compressed, not in ``kv_bytes``).
        """
        held = self._compressed_layers()
        layers = [layer.stats() for layer in held]
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
        out["tokens"] = max((layer.seen for layer in held), default=0)
        out["per_layer"] = [
            {"layer": layer.index, "kind": SLIDING if layer.is_sliding else FULL, "tokens": layer.held_tokens,
             "kv_bytes": ls["key"]["bytes"] + ls["value"]["bytes"],
             "avg_key_bits": 8 * ls["key"]["bytes"] / max(ls["key"]["elements"], 1),
             "avg_value_bits": 8 * ls["value"]["bytes"] / max(ls["value"]["elements"], 1),
             "key_outliers": ls["key"]["outliers"], "value_outliers": ls["value"]["outliers"]}
            for layer, ls in zip(held, layers)
        ]
        by_type: dict[str, int] = defaultdict(int)
        for row in out["per_layer"]:
            by_type[row["kind"]] += row["kv_bytes"]
        out["kv_bytes_by_layer_type"] = dict(by_type)
        out["state_bytes"] = sum(t.nbytes for t in self._state_tensors())
        return out

    def _compressed_layers(self) -> list[CompressedLayer]:
        return [layer for layer in self.layers if isinstance(layer, CompressedLayer) and layer.is_initialized]

    def _state_tensors(self) -> list[torch.Tensor]:
        """Linear-attention layers' conv and recurrent states."""
        out = []
        for layer in self.layers:
            for states in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
                out.extend(t for t in (states or {}).values() if isinstance(t, torch.Tensor))
        return out

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds for keys and values (what ``kv_bytes`` sums)."""
        out = []
        for layer in self._compressed_layers():
            for s in (layer.k, layer.v):
                for ts in s.parts().values():
                    out.extend(ts)
        return out

