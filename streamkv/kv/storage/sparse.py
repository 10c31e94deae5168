"""Sparse outlier storage: the values that normal groups leave out, with their positions.

The cache stores, per outlier, the correction its position needs on top of its group's reading, so a
reader adds them (:meth:`SparseOutliers.scatter_into`).

Outliers are stored as (position, value) pairs so that the dense groups are quantized without them
(KVQuant's dense-and-sparse split). A position is an offset in token-major order
(``token * rows * dim + row * dim + channel``), so a later chunk's outliers append without rewriting
earlier ones. It is split into a 15-bit low part, stored per outlier as int16, and a bucket number
(``offset >> 15``) stored once per occupied bucket with its count: 16 bits per outlier instead of 32.
Values are 8-bit symmetric codes with one fp16 scale per appended chunk, or fp16 values at 16 bits.
"""

from __future__ import annotations

import torch

OUTLIER_BITS = (8, 16)
_LOW_BITS = 15


class SparseOutliers:
    def __init__(self, bits: int, rows: int, dim: int):
        self.bits, self.rows, self.dim = bits, rows, dim
        self.low = torch.zeros(0, dtype=torch.int16)  # per outlier: offset & 0x7fff
        self.buckets = torch.zeros(0, dtype=torch.int32)  # per occupied bucket: offset >> 15
        self.bucket_counts = torch.zeros(0, dtype=torch.int32)
        self.values = torch.zeros(0, dtype=torch.int8 if bits == 8 else torch.float16)
        self.scales = torch.zeros(0, dtype=torch.float16)  # per appended chunk (8-bit codes)
        self.chunk_counts = torch.zeros(0, dtype=torch.int32)
        self.tokens = 0  # tokens covered so far
        self._version = 0  # bumped by every change; snapshots (shallow copies) keep theirs
        self._memo: dict = {}  # shared with snapshots: derived layouts by version

    @property
    def count(self) -> int:
        return self.low.numel()

    @property
    def version(self) -> int:
        """Bumped by every change: what a reader derived at one version holds until the next."""
        return self._version

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [self.low, self.buckets, self.bucket_counts, self.values, self.scales, self.chunk_counts]

    def append(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """Take the values of ``x`` (rows, tokens, dim) where ``mask`` is set."""
        local = mask.transpose(0, 1).reshape(-1).nonzero().squeeze(1)  # token-major, sorted
        vals = x.transpose(0, 1).reshape(-1)[local].float()
        offset = local + self.tokens * self.rows * self.dim
        buckets, counts = torch.unique_consecutive(offset >> _LOW_BITS, return_counts=True)
        dev = x.device
        self.low = torch.cat([self.low.to(dev), (offset & ((1 << _LOW_BITS) - 1)).to(torch.int16)])
        self.buckets = torch.cat([self.buckets.to(dev), buckets.to(torch.int32)])
        self.bucket_counts = torch.cat([self.bucket_counts.to(dev), counts.to(torch.int32)])
        if self.bits == 16:
            self.values = torch.cat([self.values.to(dev), vals.half()])
        else:
            absmax = vals.abs().max() if vals.numel() else torch.ones((), device=dev)
            scale = (absmax / 127).clamp_min(2.0**-14).half().reshape(1)
            self.values = torch.cat([self.values.to(dev), (vals / scale.float()).round().clamp(-127, 127).to(torch.int8)])
            self.scales = torch.cat([self.scales.to(dev), scale])
            self.chunk_counts = torch.cat([self.chunk_counts.to(dev), torch.tensor([local.numel()], dtype=torch.int32, device=dev)])
        self.tokens += x.shape[1]
        self._version += 1

    def offsets(self) -> torch.Tensor:
        high = self.buckets.long().repeat_interleave(self.bucket_counts.long(), output_size=self.count)
        return (high << _LOW_BITS) | self.low.long()

    def decoded_values(self, dtype: torch.dtype) -> torch.Tensor:
        if self.bits == 16:
            return self.values.to(dtype)
        per = self.scales.to(dtype).repeat_interleave(self.chunk_counts.long(), output_size=self.count)
        return self.values.to(dtype) * per

    def drop_tokens(self, n: int) -> None:
        """Forget the first ``n`` tokens (a sliding window moved past them): their outliers go, the
        rest keep their values and count tokens from the new first one."""
        if n <= 0:
            return
        n = min(n, self.tokens)
        cut = n * self.rows * self.dim
        idx = self.offsets()
        keep = idx >= cut
        offset = idx[keep] - cut
        buckets, counts = torch.unique_consecutive(offset >> _LOW_BITS, return_counts=True)
        if self.bits == 8:  # per appended chunk: how many of its outliers stay; chunks left empty go
            chunk = torch.repeat_interleave(torch.arange(self.chunk_counts.numel(), device=idx.device), self.chunk_counts.long())
            left = torch.bincount(chunk[keep], minlength=self.chunk_counts.numel())
            self.scales, self.chunk_counts = self.scales[left > 0].clone(), left[left > 0].to(torch.int32)
        self.values = self.values[keep]
        self.low = (offset & ((1 << _LOW_BITS) - 1)).to(torch.int16)
        self.buckets, self.bucket_counts = buckets.to(torch.int32), counts.to(torch.int32)
        self.tokens -= n
        self._version += 1

    def coordinates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, token, channel) of every outlier, tokens counted from the first appended."""
        idx = self.offsets()
        rd = self.rows * self.dim
        return (idx % rd) // self.dim, idx // rd, idx % self.dim

    def derived(self, key, make):
        """``make()``, computed once per version of the store and held by it (shared with its snapshots):
        what a reader derives from the outliers dies with them."""
        held = self._memo.get(key)
        if held is None or held[0] != self._version:
            held = self._memo[key] = (self._version, make())
        return held[1]

    def by_row(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The outliers grouped by row, in token order within a row, as a reading kernel walks them:
        ``(ptr, token, channel, value)`` with row ``r``'s at ``ptr[r]:ptr[r + 1]`` (int64, float32).
        Decoded once per version, since every decoding step reads it."""
        return self.derived("by_row", self._by_row)

    def _by_row(self):
        r, t, c = self.coordinates()
        order = torch.argsort(r, stable=True)  # coordinates come in token order: it stays within a row
        ptr = torch.zeros(self.rows + 1, dtype=torch.long, device=r.device)
        ptr[1:] = torch.bincount(r, minlength=self.rows).cumsum(0)
        return ptr, t[order].contiguous(), c[order].contiguous(), self.decoded_values(torch.float32)[order].contiguous()

    def scatter_into(self, dense: torch.Tensor) -> torch.Tensor:
        """Add the outliers into ``dense`` (rows, tokens >= self.tokens, dim) in place and return it."""
        if self.count:
            dense.index_put_(self.coordinates(), self.decoded_values(dense.dtype), accumulate=True)
        return dense
