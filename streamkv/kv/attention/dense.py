"""The reference read: materialise the whole history, then ordinary attention (SDPA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DenseBackend:
    """Layers hand over the dense history (dequantized, un-rotated, RoPE re-applied) and the model's
    own SDPA attends on it: today's path, and the reference every other backend is tested against."""

    name = "dense"
    materializes = True

    def check(self, compression, device: torch.device) -> None:
        """Serves everything."""

    def attend(self, view, query, mask, scaling):  # pragma: no cover - layers never hand it a view
        raise RuntimeError("the dense backend attends on materialised tensors, not on a view")
