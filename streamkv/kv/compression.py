"""What to compress and how: one quantizer, one sink policy and one outlier detector."""

from __future__ import annotations

from dataclasses import dataclass, field

from .attention.backend import AttentionBackend, AutoBackend
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

    def check_shapes(self, head_dim: int, chunk_size: int | None = None) -> None:
        """Fail with a one-line error if the components cannot work on this model or chunk size."""
        if self.enabled:
            self.quantizer.check_shapes(head_dim, chunk_size)
