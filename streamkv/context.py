"""What a task gets to work with: the loaded model, its tokenizer, the text and the compression."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .cache import new_cache
from .compression import Compression


@dataclass
class RunContext:
    model: torch.nn.Module
    tokenizer: Any
    compression: Compression
    chunk_size: int
    load_text: Callable[[], str]
    progress: bool = True
    caches: list = field(default_factory=list)  # the last cache built, for its stats

    def new_cache(self, quantize_own_chunk: bool = False, chunk_size: int | None = None):
        """A fresh cache for one sequence; its stats are what the run reports."""
        cache = new_cache(self.model, self.compression, chunk_size or self.chunk_size, quantize_own_chunk)
        self.caches[:] = [cache]
        return cache

    def compression_stats(self) -> dict[str, Any] | None:
        return self.caches[0].stats() if self.caches else None
