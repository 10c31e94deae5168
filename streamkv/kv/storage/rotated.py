"""A stored block of ``x H`` (H the orthonormal Hadamard matrix of the head dimension): reads back ``x``.

Readers that attend on the stored domain move the rotation to the query or the output instead
(:attr:`~streamkv.kv.attention.view.KVSegment.key_hadamard`); the dense reference rotates back here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..transforms.hadamard import hadamard_on


@dataclass
class Rotated:
    """Stored data (any stored block) of ``x H``; reads back ``x``."""

    inner: Any

    @property
    def tokens(self) -> int:
        return self.inner.tokens

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def unit_tokens(self) -> int:
        return self.inner.unit_tokens

    @property
    def numel(self) -> int:
        return self.inner.numel

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes

    @property
    def layout(self) -> tuple:
        return ("rotated", self.inner.layout)

    def tensors(self) -> list[torch.Tensor]:
        return self.inner.tensors()

    def append(self, other: "Rotated") -> "Rotated":
        """The rotation stays outermost (where readers move it to the query) over the appended inner blocks."""
        return Rotated(self.inner.append(other.inner))

    def slice_tokens(self, start: int, stop: int) -> "Rotated":
        return Rotated(self.inner.slice_tokens(start, stop))

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        y = self.inner.dequantize(dtype) @ hadamard_on(self.dim, self.device, dtype).T
        return y if out is None else out.copy_(y)
