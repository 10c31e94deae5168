"""What a task gets to work with: the loaded model, its tokenizer, the text and the compression."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..kv.compression import Compression
from ..kv.contracts import BringsOwnCache
from ..kv.errors import check
from . import registry


def new_cache(model: torch.nn.Module, compression: Compression, chunk_size: int | None = None, quantize_own_chunk: bool = False):
    """A fresh cache for ``model``: the quantizer's own (a peer that brings one) or a :class:`CompressedCache`."""
    from ..kv.cache import CompressedCache  # here, not at import: it loads transformers' cache (and hqq, if present)
    if isinstance(compression.quantizer, BringsOwnCache):
        name = registry.name_of(compression.quantizer)
        check(
            not compression.sink.size and not compression.outlier.enabled,
            f"quantizer={name} brings its own cache, which has no sinks or outliers; "
            f"use sink=none outlier=none (experiment={name} does)",
        )
        return compression.quantizer.build_cache(model, chunk_size=chunk_size, quantize_own_chunk=quantize_own_chunk)
    return CompressedCache.for_model(model, compression, chunk_size, quantize_own_chunk=quantize_own_chunk)


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
