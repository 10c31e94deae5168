"""float8 storage: one byte per element (``torch.float8_e4m3fn``) and one float32 scale per tensor.

An :class:`Fp8` block holds ``(rows, tokens, dim)`` values as ``x / scale`` cast to float8 e4m3, the
cast saturating at the format's largest finite value (±448), as vLLM's CUDA cache writer converts
(``__NV_SATFINITE``); a value reads back as ``code * scale``. The scale is one float32 number for the
whole tensor (vLLM's ``k_scale`` / ``v_scale`` of a layer): every block of one stream shares it, so
appending keeps a single scale, counted once. Readers that do not know the block (the compiled CPU
kernel, the Triton kernels) fall back to the tensor path, which calls :meth:`Fp8.dequantize`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .composite import Segments
from .raw import Elementwise

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


@dataclass
class Fp8(Elementwise):
    """float8 e4m3 codes ``data`` (rows, tokens, dim) and their float32 ``scale`` (a 0-d tensor)."""

    data: torch.Tensor
    scale: torch.Tensor
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # readers' layouts of it

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    @property
    def layout(self) -> tuple:
        """Blocks of one stream share their scale, so they concatenate; another scale is another layout."""
        return ("fp8", self.data.dtype, self.dim, float(self.scale))

    def tensors(self) -> list[torch.Tensor]:
        return [self.data, self.scale]

    def append(self, other: Any) -> Any:
        if other.layout != self.layout:
            return Segments([self]).append(other)
        return Fp8(torch.cat([self.data, other.data], 1), self.scale)

    def select_rows(self, index: torch.Tensor) -> Fp8:
        return Fp8(self.data[index], self.scale)

    def slice_tokens(self, start: int, stop: int) -> Fp8:
        return Fp8(self.data[:, start:stop], self.scale)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is not None:
            out.copy_(self.data)
            return out.mul_(self.scale.to(dtype))
        return self.data.to(dtype).mul_(self.scale.to(dtype))


def quantize_fp8(x: torch.Tensor, scale: float | torch.Tensor = 1.0) -> Fp8:
    """``x`` (rows, tokens, dim) as float8 e4m3 of ``x / scale``, saturated at ±448."""
    s = torch.as_tensor(scale, dtype=torch.float32).to(x.device).reshape(())
    data = (x.float() / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return Fp8(data, s.clone())
