"""transformers' own ``QuantizedCache`` backends as quantizers: peers on the same streaming protocol.

``hf_quanto`` (optimum-quanto, int2/int4), ``hf_hqq`` (HQQ, 1-8 bits) and ``hf_fp8`` (float8 e4m3,
one scale per tensor) build transformers' cache through :meth:`build_cache`, so the perplexity task
and the benchmark drive them chunk by chunk exactly like the compressed cache. Their ``stats()`` are
counted from the tensors each layer really holds (packed data, scales, zeros and the full-precision
residual), with the keys of :meth:`streamkv.kv.cache.CompressedCache.stats`.

transformers' integer layers keep a full-precision residual of up to ``residual_length`` tokens, but
whenever a forward brings it to that length they re-quantize the *whole* history (dequantized
groups included) into one new tensor: with 512-token chunks every chunk does so, and the residual is
empty after each prefill chunk. Sinks and outliers do not apply to these caches (use ``sink=none
outlier=none``, as the ``hf_*`` experiment presets do).
"""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...kv.compat import quantized_cache_parts
from ...kv.errors import ConfigError, check, one_of
from ...kv.model_facts import facts_of, text_config
from ..registry import register

if not torch.cuda.is_available():  # HQQ compiles a CUDA extension on import unless told not to
    os.environ.setdefault("DISABLE_CUDA", "1")


def held_bytes(obj: Any) -> int:
    """Bytes of every tensor inside ``obj``: tensors, quanto's packed tensor subclasses, tuples, dicts."""
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is not None and type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            names, _ = flatten()
            return sum(held_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(held_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(o) for o in obj.values())
    return 0


def _make_cache_class():
    from transformers.cache_utils import QuantizedCache

    class HFQuantizedCache(QuantizedCache):
        """transformers' ``QuantizedCache`` with honest ``stats()``; see the module docstring."""

        def __init__(self, backend: str, config, **kwargs):
            super().__init__(backend, config, **kwargs)
            self.backend = backend
            self.kv_shape: tuple[int, int, int] | None = None  # (batch, kv heads, head dim)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if self.kv_shape is None:
                b, h, _, d = key_states.shape
                self.kv_shape = (b, h, d)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

        def stats(self) -> dict[str, Any]:
            total: dict[str, dict[str, float]] = {k: defaultdict(float) for k in ("key", "value")}
            per_layer = []
            b, h, d = self.kv_shape or (0, 0, 0)
            tokens = 0
            for index, layer in enumerate(self.layers):
                if not getattr(layer, "is_initialized", False):
                    continue
                tokens = layer.get_seq_length()
                elements = b * h * d * tokens
                row = {"layer": index, "kind": "full", "tokens": tokens, "kv_bytes": 0}
                qk, qv = quantized_cache_parts(layer)
                for kind, q, res in (("key", qk, layer.keys), ("value", qv, layer.values)):
                    body, residual = held_bytes(q), held_bytes(res)
                    t = total[kind]
                    t["bytes"] += body + residual
                    t["bytes_body"] += body
                    t["bytes_residual"] += residual
                    t["elements"] += elements
                    row[f"avg_{kind}_bits"] = 8 * (body + residual) / max(elements, 1)
                    row["kv_bytes"] += body + residual
                    row[f"{kind}_outliers"] = 0
                per_layer.append(row)
            out: dict[str, Any] = {}
            for kind in ("key", "value"):
                t = total[kind]
                out[f"avg_{kind}_bits"] = 8 * t["bytes"] / max(t["elements"], 1)
                out[f"compression_ratio_{kind}"] = 16 / out[f"avg_{kind}_bits"] if t["bytes"] else 0.0
                out[f"{kind}_outlier_fraction"] = 0.0
            out["avg_bits"] = (out["avg_key_bits"] + out["avg_value_bits"]) / 2
            out["kv_bytes"] = int(total["key"]["bytes"] + total["value"]["bytes"])
            out["kv_bytes_fp16"] = int(2 * (total["key"]["elements"] + total["value"]["elements"]))
            out["compression_ratio"] = out["kv_bytes_fp16"] / out["kv_bytes"] if out["kv_bytes"] else 0.0
            out["bytes_by_part"] = {
                kind: {"sinks": 0, "body": int(total[kind]["bytes_body"]), "outliers": 0, "residual": int(total[kind]["bytes_residual"])}
                for kind in ("key", "value")
            }
            out["tokens"] = tokens
            out["per_layer"] = per_layer
            out["kv_bytes_by_layer_type"] = {"full": out["kv_bytes"]}  # every layer of transformers' QuantizedCache is full
            out["state_bytes"] = 0
            return out

    return HFQuantizedCache


_CACHE_CLASS = None


def cache_class():
    """The ``QuantizedCache`` subclass with ``stats()`` (built on first use: transformers imports lazily)."""
    global _CACHE_CLASS
    if _CACHE_CLASS is None:
        _CACHE_CLASS = _make_cache_class()
    return _CACHE_CLASS


class _HFCacheQuantizer:
    """What every wrapped backend shares: the quantizer protocol of the compressed cache, and build_cache."""

    backend: ClassVar[str]
    package: ClassVar[str | None] = None  # importable module the backend needs
    pip_name: ClassVar[str | None] = None

    enabled = True
    pre_rope = False
    token_block = 1

    @classmethod
    def missing(cls) -> str | None:
        """Why the backend cannot run here (its package is absent), or None."""
        if cls.package is None:
            return None
        try:
            found = importlib.util.find_spec(cls.package) is not None
        except ModuleNotFoundError:
            found = False
        return None if found else f"quantizer={cls.registered_name} needs {cls.pip_name}: pip install {cls.pip_name}"  # type: ignore[attr-defined]

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        reason = self.missing()
        check(reason is None, reason or "")

    def cache_kwargs(self) -> dict[str, Any]:
        return {}

    def build_cache(self, model: torch.nn.Module, chunk_size: int | None = None, quantize_own_chunk: bool = False):
        """A fresh transformers ``QuantizedCache`` of this backend for ``model`` (with ``stats()``)."""
        check(
            not quantize_own_chunk,
            f"quantizer={self.registered_name} wraps transformers' cache, which cannot quantize a chunk's own keys "  # type: ignore[attr-defined]
            "(task.mode=full); use task.mode=stream",
        )
        for head_dim in facts_of(model).head_dims:
            self.check_shapes(head_dim, chunk_size)
        try:
            return cache_class()(self.backend, text_config(model.config), **self.cache_kwargs())
        except (ImportError, ValueError) as e:
            raise ConfigError(f"quantizer={self.registered_name}: {str(e).strip().splitlines()[0]}") from None  # type: ignore[attr-defined]


@dataclass
class _GroupWise(_HFCacheQuantizer):
    bits: int = 4
    group_size: int = 64
    residual_length: int = 128
    axis_key: int = 0
    axis_value: int = 0

    BITS: ClassVar[tuple[int, ...]] = ()
    AXES: ClassVar[tuple[int, ...]] = ()

    def __post_init__(self) -> None:
        one_of("quantizer.bits", self.bits, self.BITS)
        one_of("quantizer.axis_key", self.axis_key, self.AXES)
        one_of("quantizer.axis_value", self.axis_value, self.AXES)
        check(self.group_size >= 1, f"quantizer.group_size={self.group_size} must be >= 1")
        check(self.residual_length >= 0, f"quantizer.residual_length={self.residual_length} must be >= 0")

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        super().check_shapes(head_dim, chunk_size)
        check(head_dim % self.group_size == 0, f"quantizer.group_size={self.group_size} does not divide head_dim={head_dim}")

    def cache_kwargs(self) -> dict[str, Any]:
        return {
            "nbits": self.bits,
            "q_group_size": self.group_size,
            "residual_length": self.residual_length,
            "axis_key": self.axis_key,
            "axis_value": self.axis_value,
        }

    def describe(self) -> str:
        return f"{self.backend} int{self.bits} g{self.group_size} r{self.residual_length}"


@register("quantizer", "hf_quanto")
@dataclass
class HFQuanto(_GroupWise):
    """optimum-quanto int2/int4 groups of ``group_size`` along the head dimension (axis 0)."""

    backend: ClassVar[str] = "quanto"
    package: ClassVar[str] = "optimum.quanto"
    pip_name: ClassVar[str] = "optimum-quanto"
    BITS: ClassVar[tuple[int, ...]] = (2, 4)
    AXES: ClassVar[tuple[int, ...]] = (0, -1)


@register("quantizer", "hf_hqq")
@dataclass
class HFHqq(_GroupWise):
    """HQQ groups (optimised zero points); axis 1 = contiguous groups along the head dimension,
    the setting transformers' docs recommend for HQQ (axis 0 groups strided elements)."""

    axis_key: int = 1
    axis_value: int = 1

    backend: ClassVar[str] = "hqq"
    package: ClassVar[str] = "hqq"
    pip_name: ClassVar[str] = "hqq"
    BITS: ClassVar[tuple[int, ...]] = (1, 2, 3, 4, 8)
    AXES: ClassVar[tuple[int, ...]] = (0, 1)


@register("quantizer", "hf_fp8")
@dataclass
class HFFp8(_HFCacheQuantizer):
    """float8 e4m3 with one scale per layer and kind, frozen after the first chunk (no residual)."""

    backend: ClassVar[str] = "fp8"
    residual_length: ClassVar[int] = 0

    def describe(self) -> str:
        return "fp8 e4m3 per-tensor"
