"""vLLM's TurboQuant KV cache (``--kv-cache-dtype turboquant_*``), reproduced from its code on the
streaming protocol.

Read from vllm-project/vllm: ``vllm/model_executor/layers/quantization/turboquant/config.py``
(``TQ_PRESETS``, packed sizes, ``get_boundary_skip_layers``), ``.../turboquant/centroids.py`` (Lloyd-Max
centroids of N(0, 1/d)), ``vllm/v1/attention/ops/triton_turboquant_store.py`` (the store kernels) and
``vllm/v1/attention/backends/turboquant_attn.py`` (Sylvester-Hadamard rotation, shared by every layer,
no random signs; first prefill chunks attend their raw K/V, continuation chunks the dequantized cache
plus their own raw K/V: the streaming protocol of this project).

Reproduced, per token and KV head (each vector quantized as a whole, no groups, no sinks, no outliers):

* keys (``key_bits`` 3 or 4): ``||k||``, the unit vector Hadamard-rotated, each coordinate the index of
  its nearest Lloyd-Max (Gaussian, MSE-optimal) level; one fp16 number per vector
  (:func:`~streamkv.kv.storage.turboquant.quantize_unit_norm`). **Norm correction** (``*_nc`` presets):
  the centroid vector is re-normalised before it is scaled by the stored norm, so every read-back key
  has its original L2 norm. Keys are stored after RoPE, as vLLM caches them.
* keys ``key_bits=8`` (``k8v4``): float8 e4m3, no rotation, no scale (vLLM casts the key as it is).
* values: min-max (uniform) codes over the whole head vector, an fp16 scale and an fp16 minimum each,
  no rotation.
* the first and last ``edge_layers`` (2; at most half the layers, as vLLM caps it) hold their keys and
  values unquantized (fp16 :class:`~streamkv.kv.storage.raw.Raw`: vLLM keeps them in the serving
  dtype, bf16/fp16, what its compression ratios are measured against), counted in every byte report.
* the presets: ``k8v4`` (fp8 keys, 4-bit values), ``4bit_nc``, ``k3v4_nc``, ``3bit_nc``; vLLM's own
  figures on its models: 2.6x / +1.17%, 3.8x / +2.71%, ~3.5x / +10.6%, 4.9x / +20.6% perplexity.

Not reproduced: the QJL residual bit of the TurboQuant paper (vLLM drops it too); the exact centroid
numbers (vLLM solves Lloyd-Max with a 200-point trapezoid rule and at most 200 iterations, within 0.002
of the exact levels used here); the fp16 rounding of vLLM's stored norm (here the fp16 number is the
norm divided by the centroid vector's norm: same bytes, same precision); vLLM's byte layout (key and value
of a slot interleaved, padded to an even size: up to one byte per token and head not counted here);
its hybrid-model rule (no edge layers when the model mixes attention with linear/Mamba layers: here
the edges are counted over all layers); FP8 keys in e4b15 on pre-Hopper GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import check, one_of
from ..storage.fp8 import quantize_fp8
from ..storage.packed import quantize
from ..storage.packing import RAW_BITS
from ..storage.turboquant import quantize_unit_norm
from ..transforms.hadamard import is_power_of_two
from .base import GroupedQuantizer

FP8_KEYS = 8  # key_bits meaning float8 e4m3 keys (vLLM's key_quant_bits=8)
PRESETS = {  # vLLM's TQ_PRESETS: key bits, value bits, norm correction
    "k8v4": (8, 4, False),
    "4bit_nc": (4, 4, True),
    "k3v4_nc": (3, 4, True),
    "3bit_nc": (3, 3, True),
}
PREFIX = "turboquant_"  # vLLM's spelling: --kv-cache-dtype turboquant_k3v4_nc
CODES = {f"{k}{v}": name for name, (k, v, _) in PRESETS.items()}  # "84", "44", "34", "33": key then value bits


def preset_name(preset: str) -> str:
    """The preset ``preset`` names (vLLM's name with or without ``turboquant_``, or its key-value code
    such as ``34``); a one-line error lists the valid ones."""
    p = str(preset)
    p = p.removeprefix(PREFIX)
    p = CODES.get(p, p)
    check(p in PRESETS, f"quantizer.preset={preset!r} is not a TurboQuant preset; choose one of {list(PRESETS)} "
                        f"(vLLM's names, '{PREFIX}' optional, or the key-value bit codes {list(CODES)})")
    return p


@dataclass
class TurboQuantQuantizer(GroupedQuantizer):
    """vLLM's TurboQuant cache (see the module docstring). ``preset`` sets ``key_bits`` (3/4 Lloyd-Max
    with the vector's norm, 8 = fp8), ``value_bits`` (min-max) and ``norm_correction``; any of the
    three set explicitly overrides the preset's."""

    preset: str = "4bit_nc"
    key_bits: Optional[int] = None  # type: ignore[assignment]  # None: the preset's
    value_bits: Optional[int] = None  # type: ignore[assignment]
    norm_correction: Optional[bool] = None
    key_axis: str = "token"
    key_group_size: int = 0
    value_group_size: int = 0
    pre_rope: bool = False
    edge_layers: int = 2  # the first and last N layers (at most half of them) unquantized

    def __post_init__(self) -> None:
        self.preset = preset_name(self.preset)
        k, v, nc = PRESETS[self.preset]
        self.key_bits = k if self.key_bits is None else self.key_bits
        self.value_bits = v if self.value_bits is None else self.value_bits
        self.norm_correction = nc if self.norm_correction is None else self.norm_correction
        super().__post_init__()
        for kind in ("key", "value"):
            one_of(f"quantizer.{kind}_axis", getattr(self, f"{kind}_axis"), ["token"])
            check(getattr(self, f"{kind}_group_size") == 0, f"quantizer.{kind}_group_size must be 0: TurboQuant quantizes each vector whole")
        one_of("quantizer.edge_bits", self.edge_bits, [RAW_BITS])

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        super().check_shapes(head_dim, chunk_size)
        if self.key_bits != FP8_KEYS:
            check(is_power_of_two(head_dim), f"quantizer=turboquant: head_dim={head_dim} is not a power of two (its Hadamard rotation needs one)")

    # -- layers ---------------------------------------------------------------------------------------
    def edges(self, num_layers: int | None = None) -> int:
        """How many layers at each end stay unquantized: ``edge_layers``, at most half the layers (vLLM)."""
        n = self.num_layers if num_layers is None else num_layers
        return min(self.edge_layers, n // 2) if n > 0 else 0

    def is_edge(self, layer: int, num_layers: int | None = None) -> bool:
        n = self.num_layers if num_layers is None else num_layers
        e = self.edges(n)
        return e > 0 and (layer < e or layer >= n - e)

    # -- encoding -------------------------------------------------------------------------------------
    def encode(self, kind: str, x: torch.Tensor, exclude: torch.Tensor | None, bits: int) -> Any:
        if kind == "value":
            return quantize(x, bits, "token", x.shape[-1], exclude)
        if bits == FP8_KEYS:
            return quantize_fp8(x)  # scale 1.0: vLLM casts the key as it is
        return quantize_unit_norm(x, bits, bool(self.norm_correction), exclude)

    def describe(self) -> str:
        keys = "fp8" if self.key_bits == FP8_KEYS else f"{self.key_bits}-bit Lloyd-Max{' +norm' if self.norm_correction else ''}"
        return f"turboquant {self.preset}: K {keys}, V {self.value_bits}-bit min-max, per token; {self.edge_layers} edge layers fp16"
