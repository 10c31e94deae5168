"""The streaming compressed KV cache: a transformers ``Cache`` of per-layer compressed stores.

Each layer keeps, in sequence order:

1. **compressed history** - packed b-bit groups from the quantizer, aligned to absolute positions,
   with the outliers found by the detector moved into sparse storage so that they neither widen
   their group nor lose precision;
2. **sinks** - a higher-precision copy (sink bit width, or fp16) of the first ``sink.size`` tokens,
   which replaces them when the history is read;
3. **residual** - tokens not yet compressed, at full precision: the tail of a chunk that does not
   fill a key group, KIVI's recent window, or the tokens of decoding until a group is full.

``update`` is called once per layer per forward (one prefill chunk, or one decoded token). It returns
the dequantized history followed by the new tokens at full precision (the chunk attends to its own
exact keys and values), then compresses the new tokens. Only the compressed form is kept.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .compression import Compression
from .errors import ConfigError, check
from .quantization import Raw, encode
from .rope import RopeTable
from .sparse import SparseOutliers

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")


class _Stream:
    """The store of one tensor kind (keys or values) of one layer."""

    def __init__(self, rows: int, dim: int, outlier_bits: int | None):
        self.sinks: Any = None
        self.body: Any = None
        self.outliers = SparseOutliers(outlier_bits, rows, dim) if outlier_bits else None
        self.residual: torch.Tensor | None = None
        self.detector_state: Any = None

    def parts(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor held, by category (for honest byte counts)."""
        out = {"sinks": [], "body": [], "outliers": [], "residual": []}
        if self.sinks is not None:
            out["sinks"] = self.sinks.tensors()
        if self.body is not None:
            out["body"] = self.body.tensors()
        if self.outliers is not None:
            out["outliers"] = self.outliers.tensors()
        if self.residual is not None:
            out["residual"] = [self.residual]
        return out


class CompressedLayer(CacheLayerMixin):
    """One layer's compressed keys and values; see the module docstring."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, compression: Compression, rope: RopeTable | None = None, quantize_own_chunk: bool = False):
        super().__init__()
        self.c = compression
        self.rope = rope if compression.enabled and compression.quantizer.pre_rope else None
        self.quantize_own_chunk = quantize_own_chunk
        self.seen = 0  # tokens received; also the next token's position

    # -- transformers' layer protocol -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.batch, self.heads, self.dim = b, h, d
        self.rows = b * h
        self.dtype, self.device = key_states.dtype, key_states.device
        out = self.c.outlier if self.c.enabled and self.c.outlier.enabled else None
        self.k = _Stream(self.rows, d, out.key_bits if out is not None and out.keys else None)
        self.v = _Stream(self.rows, d, out.value_bits if out is not None and out.values else None)
        for s in (self.k, self.v):
            s.residual = key_states.new_empty(self.rows, 0, d)
            s.detector_state = out.new_state() if out is not None else None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, d = key_states.shape
        k = key_states.reshape(self.rows, t, d)
        v = value_states.reshape(self.rows, t, d)
        if self.quantize_own_chunk:  # simulated protocol: the chunk also sees its own compressed K/V
            self._append(k, v)
            keys, values = self._read()
        else:
            keys, values = self._read(k, v)  # the history, then the new tokens at full precision
            self._append(k, v)
        return keys.view(b, h, -1, d), values.view(b, h, -1, d)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the compressed cache does not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the compressed cache cannot be cropped (compressed groups are not undoable)")

    # -- storage ----------------------------------------------------------------------------------
    @property
    def body_tokens(self) -> int:
        return 0 if self.k.body is None else self.k.body.tokens

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.residual = torch.cat([self.k.residual, k], 1)
        self.v.residual = torch.cat([self.v.residual, v], 1)
        self.seen += k.shape[1]
        if not self.c.enabled:
            return
        q = self.c.quantizer
        pending = self.k.residual.shape[1] - q.residual_length
        n = (pending // q.token_block) * q.token_block if pending > 0 else 0
        if n:
            start = self.body_tokens
            kb, vb = self.k.residual[:, :n], self.v.residual[:, :n]
            self.k.residual, self.v.residual = self.k.residual[:, n:], self.v.residual[:, n:]
            if self.rope is not None:
                kb = self.rope.unrotate(kb, start)
            n_sink = min(max(self.c.sink.size - start, 0), n)
            self._compress(self.k, kb, q.encode_keys, n_sink, self.c.sink.key_bits)
            self._compress(self.v, vb, q.encode_values, n_sink, self.c.sink.value_bits)

    def _compress(self, s: _Stream, x: torch.Tensor, encoder, n_sink: int, sink_bits: int) -> None:
        """Compress a block of whole groups whose first ``n_sink`` tokens are attention sinks.

        Sinks keep their own higher-precision copy; inside the groups they are excluded from the range
        (like outliers) so the groups stay aligned to absolute positions, and they take no part in the
        outlier statistics, whose scale they would distort.
        """
        exclude = None
        if n_sink:
            sinks = encode(x[:, :n_sink], sink_bits, "token", self.dim)
            s.sinks = sinks if s.sinks is None else s.sinks.append(sinks)
            exclude = torch.zeros_like(x, dtype=torch.bool)
            exclude[:, :n_sink] = True
        if s.outliers is not None:
            mask = torch.zeros_like(x, dtype=torch.bool)
            if n_sink < x.shape[1]:
                mask[:, n_sink:] = self.c.outlier.detect(x[:, n_sink:], s.detector_state)
            s.outliers.append(x, mask)
            exclude = mask if exclude is None else exclude | mask
        enc = encoder(x, exclude)
        s.body = enc if s.body is None else s.body.append(enc)

    def _read_stream(self, s: _Stream, rotate: bool, new: torch.Tensor | None = None) -> torch.Tensor:
        """The stream's history (dequantized body, then the residual), followed by ``new`` if given.

        Everything is written into one buffer: the body dequantizes into its slice, so neither the
        history nor the new tokens are copied a second time by a concatenation.
        """
        tail = [s.residual] if new is None else [s.residual, new]
        if s.body is None:
            return tail[0] if len(tail) == 1 else torch.cat(tail, 1)
        n = s.body.tokens
        out = torch.empty(self.rows, n + sum(t.shape[1] for t in tail), self.dim, dtype=self.dtype, device=self.device)
        body = out[:, :n]
        s.body.dequantize(self.dtype, out=body)
        if s.outliers is not None:
            s.outliers.scatter_into(body)
        if s.sinks is not None:
            body[:, : s.sinks.tokens] = s.sinks.dequantize(self.dtype)
        if rotate:
            self.rope.rotate_(body, 0)
        torch.cat(tail, 1, out=out[:, n:]) if len(tail) > 1 else out[:, n:].copy_(tail[0])
        return out

    def _read(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole history, dequantized once for this forward (the read path a fused kernel replaces),
        followed by this forward's own ``k``/``v`` when given."""
        return self._read_stream(self.k, self.rope is not None, k), self._read_stream(self.v, False, v)

    # -- accounting -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Bytes of every tensor held and elements represented, per kind and category."""
        out: dict[str, Any] = {}
        for kind, s in (("key", self.k), ("value", self.v)):
            by_cat = {cat: sum(t.nbytes for t in ts) for cat, ts in s.parts().items()}
            out[kind] = {
                "bytes": sum(by_cat.values()),
                "bytes_by_part": by_cat,
                "elements": self.rows * self.seen * self.dim,
                "outliers": 0 if s.outliers is None else s.outliers.count,
            }
        return out


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
    ):
        if compression.enabled and compression.quantizer.pre_rope and rope is None:
            raise ConfigError("quantizer.pre_rope=true needs the model's rotary embedding; build with CompressedCache.for_model")
        self.compression = compression
        super().__init__(layers=[CompressedLayer(compression, rope, quantize_own_chunk) for _ in range(num_layers)])

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
        return cls(compression, config.num_hidden_layers, rope, quantize_own_chunk)

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

