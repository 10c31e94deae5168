"""A fixed fraction of each chunk's most extreme values (KVQuant's dense-and-sparse split)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import check, one_of
from ..storage.sparse import OUTLIER_BITS
from .ema_relative import channel_stats


@dataclass
class TopKOutliers:
    """The ``fraction`` of values of a chunk (per row) farthest from their channel's mean, in units of
    the channel's standard deviation. Needs no threshold and no state, at a fixed storage cost."""

    fraction: float = 0.01
    key_bits: int = 8
    value_bits: int = 8
    keys: bool = True
    values: bool = True

    enabled = True

    def __post_init__(self) -> None:
        check(0 < self.fraction < 1, f"outlier.fraction={self.fraction} must be in (0, 1)")
        one_of("outlier.key_bits", self.key_bits, OUTLIER_BITS)
        one_of("outlier.value_bits", self.value_bits, OUTLIER_BITS)

    def new_state(self) -> None:
        return None

    def detect(self, x: torch.Tensor, state: None) -> torch.Tensor:
        mean, std = channel_stats(x)
        score = ((x.float() - mean.unsqueeze(1)) / std.unsqueeze(1).clamp_min(1e-6)).abs()
        flat = score.flatten(1)
        k = max(1, math.ceil(self.fraction * flat.shape[1]))
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask.scatter_(1, flat.topk(k, dim=1).indices, True)
        return mask.view_as(x)
