"""Questions asked of an ``exclude`` mask (bool, (rows, tokens, dim): values stored elsewhere) on every
compressed block, and the mean that leaves its values out. Answered by integer sums: torch's boolean
``any``/``all`` reductions are several times slower than a sum over the same bytes on the CPU, and
these run once per layer, kind and chunk."""

from __future__ import annotations

import torch


def any_set(mask: torch.Tensor | None) -> bool:
    """Whether any value of ``mask`` is set (False for None)."""
    return mask is not None and bool(mask.count_nonzero())


def whole_tokens(mask: torch.Tensor) -> torch.Tensor:
    """(rows, tokens, 1): the tokens whose every value is set (sinks, stored whole elsewhere)."""
    return mask.sum(-1, keepdim=True, dtype=torch.int32) == mask.shape[-1]


def kept_mean(x: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """(rows, 1, dim): each (row, channel)'s mean over the tokens of ``x`` that ``exclude`` leaves in
    (0 where it leaves none)."""
    keep = ~exclude
    return (x * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
