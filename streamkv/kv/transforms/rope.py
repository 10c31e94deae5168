"""Undo and redo the rotary position embedding, for caches that store keys before RoPE.

transformers 5 hands ``Cache.update`` keys that are already rotated and no cos/sin, so the table
comes from the model's own rotary module at the positions the cache tracks. Each layer gets the
table of its own RoPE: models with per-layer-type RoPE (Gemma-3/4 local vs global base, OLMo-3) take
the layer type; partial rotary (Qwen3.5, Phi-3 variants) rotates only the leading ``cos.shape[-1]``
channels, as the models' ``apply_rotary_pos_emb`` does; Gemma-4's proportional RoPE is full width
with zero frequencies past its fraction; scaled RoPE (linear, llama3, yarn) comes out of the module
as it is. Dynamic variants, whose frequencies change with the sequence length, cannot be undone
(the model facts refuse pre-RoPE storage for them).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RopeTable:
    """cos/sin for positions 0..n of one layer's RoPE, computed by the model's rotary module and grown on demand.

    ``layer_type``: the argument a per-layer-type rotary module takes (``"sliding_attention"``...);
    None for a module with one RoPE.
    """

    def __init__(self, rotary_emb: torch.nn.Module, layer_type: str | None = None):
        self.rotary_emb = rotary_emb
        self.layer_type = layer_type
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.derived: dict = {}  # readers' layouts of this table (e.g. the CPU kernel's): they die with it

    def _table(self, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None or self.cos.shape[0] < end or self.cos.device != like.device:
            size = max(end, 2 * (0 if self.cos is None else self.cos.shape[0]), 1024)
            pos = torch.arange(size, device=like.device).unsqueeze(0)
            probe = torch.empty(0, device=like.device, dtype=torch.float32)
            args = (probe, pos) if self.layer_type is None else (probe, pos, self.layer_type)
            cos, sin = self.rotary_emb(*args)
            self.cos, self.sin = cos.reshape(size, -1).float(), sin.reshape(size, -1).float()
        return self.cos, self.sin

    def upto(self, end: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos and sin (rows: positions ``0 ..`` at least ``end``; columns: rotated channels) on
        ``device``; the same tensors until the table grows (kernels may key derived layouts on them)."""
        return self._table(end, torch.empty(0, device=device))

    @property
    def width(self) -> int | None:
        """Rotated channels (the leading ones); None before the table is first built."""
        return None if self.cos is None else self.cos.shape[-1]

    def _at(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._table(start + x.shape[-2], x)
        return cos[start : start + x.shape[-2]], sin[start : start + x.shape[-2]]

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Apply RoPE to ``x`` (..., tokens, dim) at positions ``start, start + 1, ...``."""
        cos, sin = self._at(x, start)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        r = cos.shape[-1]
        xr = x[..., :r]
        out = xr * cos + rotate_half(xr) * sin
        return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], -1)

    def rotate_(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """:meth:`rotate` in place (the same values, bit for bit, with one temporary instead of four)."""
        cos, sin = self._at(x, start)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        xr = x[..., : cos.shape[-1]]
        h = xr.shape[-1] // 2
        r = torch.empty_like(xr)  # rotate_half(xr) * sin
        torch.mul(xr[..., h:], sin[..., :h], out=r[..., :h]).neg_()
        torch.mul(xr[..., :h], sin[..., h:], out=r[..., h:])
        xr.mul_(cos).add_(r)
        return x

    def unrotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Inverse of :meth:`rotate` (also for scaled cos/sin: divides by cos^2 + sin^2)."""
        cos, sin = self._at(x, start)
        r = cos.shape[-1]
        xf = x[..., :r].float()
        out = ((xf * cos - rotate_half(xf) * sin) / (cos * cos + sin * sin)).to(x.dtype)
        return out if r == x.shape[-1] else torch.cat([out, x[..., r:]], -1)
