"""Softmax over segments merged online (flash-decoding's split-K merge): no segment is concatenated.

A :class:`Partial` is what attending on one part of the keys leaves: the running max ``m`` of the
scores, the sum ``l`` of ``exp(score - m)`` and the unnormalised outputs ``acc``. Merging rescales
both sides to the larger max, so the result equals a softmax over the concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Partial:
    m: torch.Tensor  # (rows, nq, 1) float32
    l: torch.Tensor  # (rows, nq, 1) float32
    acc: list[torch.Tensor | None]  # outputs (rows, nq, dim) float32 per value domain (plain, rotated); None = none yet

    @classmethod
    def of(cls, scores: torch.Tensor) -> tuple["Partial", torch.Tensor]:
        """The statistics of ``scores`` (rows, nq, tokens; -inf = masked) and its probabilities
        ``exp(scores - m)``; ``acc`` starts empty for the caller to fill."""
        m = scores.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a fully masked row contributes nothing
        p = torch.exp(scores - m)
        return cls(m, p.sum(-1, keepdim=True), []), p

    def merge(self, other: "Partial") -> "Partial":
        m = torch.maximum(self.m, other.m)
        a, b = torch.exp(self.m - m), torch.exp(other.m - m)
        acc = [_scaled_sum(x, a, y, b) for x, y in zip(self.acc, other.acc)]
        return Partial(m, self.l * a + other.l * b, acc)

    def output(self) -> list[torch.Tensor | None]:
        """The normalised outputs, one per value domain."""
        inv = 1.0 / self.l.clamp_min(torch.finfo(self.l.dtype).tiny)
        return [None if x is None else x * inv for x in self.acc]


def _scaled_sum(x, a, y, b):
    if x is None:
        return None if y is None else y * b
    return x * a if y is None else x * a + y * b


def merge_all(parts: list[Partial]) -> Partial:
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out
