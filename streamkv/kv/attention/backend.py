"""What an attention backend is."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .view import LayerView


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
