"""The Triton backend: fused decode and chunked-prefill kernels on the packed codes (GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass
class TritonBackend:
    name = "triton"
    materializes = False

    @staticmethod
    def importable() -> bool:
        return False

    def check(self, compression, device: torch.device) -> None:
        raise ConfigError("attention=triton has no kernels in this build; use attention=fused (or auto)")

    def attend(self, view, query, mask, scaling):  # pragma: no cover
        raise NotImplementedError
