"""vLLM's fp8 KV cache (``--kv-cache-dtype fp8``, e4m3 on CUDA): every key and value one float8 byte,
one float32 scale per layer and kind, on the streaming protocol.

What vLLM does (``vllm/attention/layer.py``: ``_k_scale`` / ``_v_scale`` buffers initialised to 1.0,
``calc_kv_scales``; the cache writer ``reshape_and_cache_flash`` stores ``x / scale`` saturated to e4m3):

* by default (``calculate_kv_scales=False``, a checkpoint without KV scales) both scales stay **1.0**:
  keys and values are cast as they are, saturating at ±448. That is ``scale: static`` here, with
  ``k_scale`` / ``v_scale`` = 1.0 (set them to a checkpoint's calibrated scales to reproduce those).
* with ``--calculate-kv-scales`` each layer sets its scales once, from its first forward:
  ``amax|k| / 200`` and ``amax|v| / 100`` (vLLM's ``K_SCALE_CONSTANT`` / ``V_SCALE_CONSTANT``), frozen
  afterwards. ``scale: calculate`` does so from each sequence's first stored chunk (vLLM's first forward
  is usually its start-up profiling run, which a streaming evaluation cannot reproduce).

Storage: :class:`~streamkv.kv.storage.fp8.Fp8` blocks, ``torch.float8_e4m3fn`` (1 byte an element) plus
the layer's float32 scale (4 bytes per layer and kind), keys after RoPE as vLLM caches them. Beside it,
``hf_fp8`` is transformers' ``QuantizedCache`` fp8 backend (a different scale rule).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import check, one_of
from ..storage.fp8 import Fp8, quantize_fp8

SCALES = ("static", "calculate")
SCALE_CONSTANTS = {"key": 200.0, "value": 100.0}  # vLLM's K_SCALE_CONSTANT, V_SCALE_CONSTANT
_TINY = 2.0**-126  # an all-zero first chunk: a finite scale


@dataclass
class Fp8Quantizer:
    """float8 e4m3 keys and values with one scale per layer and kind (see the module docstring)."""

    scale: str = "static"
    k_scale: float = 1.0
    v_scale: float = 1.0
    pre_rope: bool = False
    residual_length: int = 0

    enabled: ClassVar[bool] = True
    token_block: ClassVar[int] = 1  # every token is stored as it arrives

    def __post_init__(self) -> None:
        one_of("quantizer.scale", self.scale, SCALES)
        check(self.k_scale > 0 and self.v_scale > 0, f"quantizer.k_scale={self.k_scale}, v_scale={self.v_scale}: scales must be > 0")
        check(self.residual_length >= 0, f"quantizer.residual_length={self.residual_length} must be >= 0")
        self._scales: dict[tuple[str, int], float] = {}  # (kind, layer) -> the scale calculated for this sequence

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        pass

    def for_stream(self, num_layers: int) -> Fp8Quantizer:
        """Static scales need no state; calculated ones are this sequence's own (:class:`~streamkv.kv.contracts.PerSequence`)."""
        if self.scale == "static":
            return self
        mine = copy.copy(self)
        mine._scales = {}
        return mine

    def scale_of(self, kind: str, x: torch.Tensor, layer: int) -> float:
        if self.scale == "static":
            return self.k_scale if kind == "key" else self.v_scale
        if (kind, layer) not in self._scales:
            self._scales[(kind, layer)] = max(float(x.abs().amax()) / SCALE_CONSTANTS[kind], _TINY)
        return self._scales[(kind, layer)]

    def encode_keys(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0) -> Fp8:
        return quantize_fp8(x, self.scale_of("key", x, layer))

    def encode_values(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0) -> Fp8:
        return quantize_fp8(x, self.scale_of("value", x, layer))

    def describe(self) -> str:
        how = f"static {self.k_scale:g}/{self.v_scale:g}" if self.scale == "static" else "calculated amax/200 K, amax/100 V"
        return f"fp8 e4m3 per-tensor ({how})"
