"""What to compress and how: one quantizer, one sink policy and one outlier detector."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .attention.auto import AutoBackend
from .attention.backend import AttentionBackend
from .contracts import OutlierDetector, Quantizer, SinkPolicy
from .outliers.none import NoOutliers
from .quantizers.none import NoQuantizer
from .sinks.none import NoSinks


@dataclass
class Compression:
    """The components a :class:`~streamkv.kv.cache.CompressedCache` is built from (default: none),
    and the attention backend that reads it (default: ``auto``)."""

    quantizer: Quantizer = field(default_factory=NoQuantizer)
    sink: SinkPolicy = field(default_factory=NoSinks)
    outlier: OutlierDetector = field(default_factory=NoOutliers)
    attention: AttentionBackend | AutoBackend = field(default_factory=AutoBackend)

    @property
    def enabled(self) -> bool:
        return self.quantizer.enabled

    def check_shapes(self, head_dim: int | Iterable[int], chunk_size: int | None = None) -> None:
        """Fail with a one-line error if the components cannot work on this model or chunk size:
        ``head_dim`` is every head_dim the model's layers have (Gemma-4's global layers have their own)."""
        if self.enabled:
            for d in (head_dim,) if isinstance(head_dim, int) else dict.fromkeys(head_dim):
                self.quantizer.check_shapes(d, chunk_size)
