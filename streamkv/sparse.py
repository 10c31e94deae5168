"""Sparse outlier storage: the values that normal groups leave out, with their positions.

Outliers are stored as (position, value) pairs so that the dense groups are quantized without them
(KVQuant's dense-and-sparse split). Positions are int32 offsets in token-major order
(``token * rows * dim + row * dim + channel``), so appending a later chunk appends positions without
rewriting earlier ones. Values are 8-bit symmetric codes with one fp16 scale per appended chunk, or
fp16 values at 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

OUTLIER_BITS = (8, 16)


@dataclass
class SparseOutliers:
    bits: int
    rows: int
    dim: int
    index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    values: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int8))
    scales: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float16))  # per chunk
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))  # per chunk
    tokens: int = 0  # tokens covered so far

    @property
    def count(self) -> int:
        return self.index.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [self.index, self.values, self.scales, self.counts]

    def append(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """Take the values of ``x`` (rows, tokens, dim) where ``mask`` is set."""
        xt, mt = x.transpose(0, 1), mask.transpose(0, 1)  # token-major
        local = mt.reshape(-1).nonzero().squeeze(1)
        vals = xt.reshape(-1)[local].float()
        start = self.tokens * self.rows * self.dim
        self.index = torch.cat([self.index.to(x.device), (local + start).to(torch.int32)])
        if self.bits == 16:
            self.values = torch.cat([self.values.to(x.device, torch.float16), vals.half()])
            scale = torch.ones(1, dtype=torch.float16, device=x.device)
        else:
            absmax = vals.abs().max() if vals.numel() else torch.tensor(1.0, device=x.device)
            scale = (absmax / 127).clamp_min(2.0**-14).half().reshape(1)
            codes = (vals / scale.float()).round().clamp(-127, 127).to(torch.int8)
            self.values = torch.cat([self.values.to(x.device), codes])
        self.scales = torch.cat([self.scales.to(x.device), scale])
        self.counts = torch.cat([self.counts.to(x.device), torch.tensor([local.numel()], dtype=torch.int32, device=x.device)])
        self.tokens += x.shape[1]

    def decoded_values(self, dtype: torch.dtype) -> torch.Tensor:
        if self.bits == 16:
            return self.values.to(dtype)
        per = self.scales.to(dtype).repeat_interleave(self.counts.long(), output_size=self.count)
        return self.values.to(dtype) * per

    def scatter_into(self, dense: torch.Tensor) -> torch.Tensor:
        """Write the outliers into ``dense`` (rows, tokens >= self.tokens, dim) in place and return it."""
        if self.count == 0:
            return dense
        idx = self.index.long()
        rd = self.rows * self.dim
        t, r, d = idx // rd, (idx % rd) // self.dim, idx % self.dim
        dense[r, t, d] = self.decoded_values(dense.dtype)
        return dense

    def select_rows(self, index: torch.Tensor) -> "SparseOutliers":
        raise NotImplementedError("beam search over sparse outliers is not supported")
