"""The seed's detector: a relative threshold against per-channel statistics tracked by an EMA."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check, one_of
from ..storage.sparse import OUTLIER_BITS

GRANULARITIES = ("value", "channel")


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (row, channel)'s mean and population standard deviation over the tokens of ``x`` (rows,
    tokens, dim), as float32 (rows, dim). Two passes, as torch's ``std`` does, spelled out: its
    reduction over the middle dim is far slower on the CPU."""
    xf = x.float()
    mean = xf.mean(1)
    return mean, (xf - mean.unsqueeze(1)).square().mean(1).sqrt()


class EmaChannelStats:
    """Per-channel mean and standard deviation, smoothed across chunks.

    ``update`` folds in one chunk: ``s <- decay * s + (1 - decay) * s_chunk``; the first chunk
    initialises the state. ``decay=0`` uses each chunk's own statistics.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """``x``: (rows, tokens, dim); statistics are per (row, channel)."""
        mean, std = channel_stats(x)
        if self.mean is None:
            self.mean, self.std = mean, std
        else:
            d = self.decay
            self.mean = d * self.mean + (1 - d) * mean
            self.std = d * self.std + (1 - d) * std


@dataclass
class EmaRelativeOutliers:
    """A value is an outlier when ``|x - mean_c| > threshold * std_c`` for its channel's EMA statistics.

    With ``granularity=channel`` a whole channel is an outlier when its RMS deviation exceeds
    ``threshold`` times the median channel's (EMA-smoothed), and all its values go to sparse storage.
    """

    threshold: float = 3.0
    ema_decay: float = 0.9
    granularity: str = "value"
    key_bits: int = 8
    value_bits: int = 8
    keys: bool = True
    values: bool = False  # after a Hadamard rotation value outliers are spread out

    enabled = True

    def __post_init__(self) -> None:
        check(self.threshold > 0, f"outlier.threshold={self.threshold} must be > 0")
        check(0 <= self.ema_decay < 1, f"outlier.ema_decay={self.ema_decay} must be in [0, 1)")
        one_of("outlier.granularity", self.granularity, GRANULARITIES)
        one_of("outlier.key_bits", self.key_bits, OUTLIER_BITS)
        one_of("outlier.value_bits", self.value_bits, OUTLIER_BITS)

    def new_state(self) -> EmaChannelStats:
        return EmaChannelStats(self.ema_decay)

    def detect(self, x: torch.Tensor, state: EmaChannelStats) -> torch.Tensor:
        state.update(x)
        dev = (x.float() - state.mean.unsqueeze(1)).abs()
        if self.granularity == "value":
            return dev > self.threshold * state.std.unsqueeze(1)
        typical = state.std.median(dim=-1, keepdim=True).values
        channels = state.std > self.threshold * typical  # (rows, dim)
        return channels.unsqueeze(1).expand_as(dev)
