"""What every group quantizer shares: the geometry of its groups, its checks, edge layers, and the
encode entry points.

A quantizer is policy only: it decides widths, axes and group sizes and calls a codec of
:mod:`streamkv.kv.storage` to hold the result. Subclasses add their own fields and implement
:meth:`GroupedQuantizer.encode`; they redeclare a geometry field only to change its default.

Edge layers: production caches keep the first and last layers unquantized (vLLM's TurboQuant keeps
two of each; SGLang users report int4 losing far less with layer 0 in bf16), because the first
layers' keys carry the position/sink structure every later layer builds on and the last layers feed
the logits directly. ``edge_layers=N`` stores the first and last N layers at ``edge_bits`` (16: fp16,
not quantized), counted in every byte report and, under a budget, paid for out of it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import check, one_of
from ..storage.packed import AXES
from ..storage.packing import RAW_BITS, WIDTHS
from ..storage.raw import Raw

KINDS = ("key", "value")


@dataclass
class GroupedQuantizer:
    """b-bit groups of keys and values: per channel along tokens (``axis="channel"``, ``group_size``
    tokens) or per token along the head dimension (``axis="token"``, ``group_size`` channels; 0 = the
    whole head). ``pre_rope`` stores keys before the rotary embedding; ``residual_length`` keeps that
    many of the most recent tokens at full precision (KIVI's window). ``WIDTHS``: the packable widths
    this quantizer serves."""

    key_bits: int = 4
    value_bits: int = 4
    key_axis: str = "channel"
    value_axis: str = "token"
    key_group_size: int = 128
    value_group_size: int = 64
    pre_rope: bool = True
    residual_length: int = 0
    edge_layers: int = 0  # the first and last N layers at edge_bits (see the module docstring)
    edge_bits: int = 16  # 16: fp16 (not quantized); or a width

    WIDTHS: ClassVar[tuple[int, ...]] = tuple(b for b in WIDTHS if b >= 2)
    enabled: ClassVar[bool] = True
    num_layers: ClassVar[int] = 0  # the model's layers, known per stream (:meth:`for_stream`)

    def __post_init__(self) -> None:
        for kind in KINDS:
            one_of(f"quantizer.{kind}_bits", getattr(self, f"{kind}_bits"), self.WIDTHS)
            axis, g = getattr(self, f"{kind}_axis"), getattr(self, f"{kind}_group_size")
            one_of(f"quantizer.{kind}_axis", axis, AXES)
            check(g >= 1 or (g == 0 and axis == "token"), f"quantizer.{kind}_group_size={g} must be >= 1 (0 = head_dim, per-token groups only)")
        check(self.residual_length >= 0, f"quantizer.residual_length={self.residual_length} must be >= 0")
        check(self.edge_layers >= 0, f"quantizer.edge_layers={self.edge_layers} must be >= 0")
        one_of("quantizer.edge_bits", self.edge_bits, (*self.WIDTHS, RAW_BITS))

    @property
    def token_block(self) -> int:
        """Tokens that must gather before keys and values can be compressed together."""
        unit = lambda axis, g: g if axis == "channel" else 1  # noqa: E731
        return math.lcm(unit(self.key_axis, self.key_group_size), unit(self.value_axis, self.value_group_size))

    def group_size(self, kind: str, head_dim: int) -> int:
        """``kind``'s group size, where 0 along the head dimension means the whole head."""
        axis, g = getattr(self, f"{kind}_axis"), getattr(self, f"{kind}_group_size")
        return head_dim if g == 0 and axis == "token" else g

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        for kind in KINDS:
            axis, g = getattr(self, f"{kind}_axis"), getattr(self, f"{kind}_group_size")
            if axis == "token" and g:
                check(head_dim % g == 0, f"quantizer.{kind}_group_size={g} does not divide head_dim={head_dim}")
        if chunk_size is not None:
            check(
                chunk_size >= self.token_block,
                f"chunk_size={chunk_size} is smaller than a key group ({self.token_block} tokens); "
                f"use chunk_size >= {self.token_block} or a smaller quantizer.key_group_size",
            )

    def for_stream(self, num_layers: int) -> "GroupedQuantizer":
        """What one cache encodes with: this quantizer, told the model's layers where edge layers need them."""
        if not self.edge_layers:
            return self
        mine = copy.copy(self)
        mine.num_layers = num_layers
        return mine

    def is_edge(self, layer: int, num_layers: int | None = None) -> bool:
        """Whether ``layer`` is one of the first or last ``edge_layers`` of ``num_layers``."""
        n = self.num_layers if num_layers is None else num_layers
        return self.edge_layers > 0 and n > 0 and (layer < self.edge_layers or layer >= n - self.edge_layers)

    def encode_keys(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0) -> Any:
        return self.encode_at("key", x, exclude, self.edge_bits if self.is_edge(layer) else self.key_bits)

    def encode_values(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0) -> Any:
        return self.encode_at("value", x, exclude, self.edge_bits if self.is_edge(layer) else self.value_bits)

    def encode_at(self, kind: str, x: torch.Tensor, exclude: torch.Tensor | None, bits: int) -> Any:
        """:meth:`encode`, or fp16 as it is for ``bits == 16``."""
        return Raw(x.half()) if bits == RAW_BITS else self.encode(kind, x, exclude, bits)

    def encode(self, kind: str, x: torch.Tensor, exclude: torch.Tensor | None, bits: int) -> Any:
        """``x`` (rows, tokens, dim) of ``kind`` ("key"/"value") at ``bits``, ``exclude``d values left out."""
        raise NotImplementedError
