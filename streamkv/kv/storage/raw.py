"""Unquantized storage: fp16 sinks and the full-precision residual, with the stored-block interface."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class Elementwise:
    """A block that holds one ``data`` element per value, ``(rows, tokens, dim)``: its shape answers."""

    data: torch.Tensor
    unit_tokens = 1

    @property
    def tokens(self) -> int:
        return self.data.shape[1]

    @property
    def dim(self) -> int:
        return self.data.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def numel(self) -> int:
        return self.data.numel()


@dataclass
class Raw(Elementwise):
    """``(rows, tokens, dim)`` held as it is; same interface as the packed blocks."""

    data: torch.Tensor
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # readers' layouts of it

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def layout(self) -> tuple:
        return ("raw", self.data.dtype, self.dim)

    def tensors(self) -> list[torch.Tensor]:
        return [self.data]

    def append(self, other: "Raw") -> "Raw":
        return Raw(torch.cat([self.data, other.data], 1))

    def select_rows(self, index: torch.Tensor) -> "Raw":
        return Raw(self.data[index])

    def slice_tokens(self, start: int, stop: int) -> "Raw":
        return Raw(self.data[:, start:stop])

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is not None:
            return out.copy_(self.data)
        return self.data.to(dtype)
