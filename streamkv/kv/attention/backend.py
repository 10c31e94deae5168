"""What an attention backend is, and which one serves a device when none is named (``auto``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..segments import LayerView


@runtime_checkable
class AttentionBackend(Protocol):
    """How a forward attends on a compressed layer.

    ``materializes``: layers hand the backend dense K/V (the reference) instead of a
    :class:`LayerView`. ``check`` refuses, in one line, storage or a device it cannot serve.
    ``attend`` takes the query (batch, q_heads, q_len, dim) and the mask transformers built
    (bool, True = attend; None = none needed) and returns (batch, q_len, q_heads, dim).
    """

    name: str
    materializes: bool

    def check(self, compression, device: torch.device) -> None: ...

    def attend(self, view: LayerView, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor: ...


@dataclass
class AutoBackend:
    """The fastest backend that meets the quality target on the model's device, chosen by measurement
    (README, "Attention backends"): on the CPU, ``fused`` for decoding and the dense read for prefill
    chunks (:class:`~streamkv.kv.attention.split.SplitBackend`); ``triton`` on a CUDA GPU where
    Triton is installed, else ``fused``."""

    name = "auto"

    def resolve(self, device: torch.device) -> AttentionBackend:
        from .fused import FusedBackend

        if device.type == "cuda":
            from .triton import TritonBackend

            if TritonBackend.importable():
                return TritonBackend()
        if device.type == "cpu":
            from .split import SplitBackend

            return SplitBackend()
        return FusedBackend()
