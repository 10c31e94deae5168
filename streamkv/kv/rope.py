"""Undo and redo the rotary position embedding, for caches that store keys before RoPE.

transformers 5 hands ``Cache.update`` keys that are already rotated and no cos/sin, so the table
comes from the model's own ``rotary_emb`` module at the positions the cache tracks. This assumes a
static RoPE (default, linear, llama3, yarn); dynamic variants change frequencies with length.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RopeTable:
    """cos/sin for positions 0..n, computed by the model's rotary module and grown on demand."""

    def __init__(self, rotary_emb: torch.nn.Module):
        self.rotary_emb = rotary_emb
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    def _table(self, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None or self.cos.shape[0] < end or self.cos.device != like.device:
            size = max(end, 2 * (0 if self.cos is None else self.cos.shape[0]), 1024)
            pos = torch.arange(size, device=like.device).unsqueeze(0)
            probe = torch.empty(0, device=like.device, dtype=torch.float32)
            cos, sin = self.rotary_emb(probe, pos)
            self.cos, self.sin = cos[0].float(), sin[0].float()
        return self.cos, self.sin

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Apply RoPE to ``x`` (..., tokens, dim) at positions ``start, start + 1, ...``."""
        cos, sin = self._table(start + x.shape[-2], x)
        cos, sin = cos[start : start + x.shape[-2]].to(x.dtype), sin[start : start + x.shape[-2]].to(x.dtype)
        return x * cos + rotate_half(x) * sin

    def rotate_(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """:meth:`rotate` in place (the same values, bit for bit, with one temporary instead of four)."""
        cos, sin = self._table(start + x.shape[-2], x)
        cos, sin = cos[start : start + x.shape[-2]].to(x.dtype), sin[start : start + x.shape[-2]].to(x.dtype)
        h = x.shape[-1] // 2
        r = torch.empty_like(x)  # rotate_half(x) * sin
        torch.mul(x[..., h:], sin[..., :h], out=r[..., :h]).neg_()
        torch.mul(x[..., :h], sin[..., h:], out=r[..., h:])
        return x.mul_(cos).add_(r)

    def unrotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Inverse of :meth:`rotate` (also for scaled cos/sin: divides by cos^2 + sin^2)."""
        cos, sin = self._table(start + x.shape[-2], x)
        cos, sin = cos[start : start + x.shape[-2]], sin[start : start + x.shape[-2]]
        xf = x.float()
        return ((xf * cos - rotate_half(xf) * sin) / (cos * cos + sin * sin)).to(x.dtype)
