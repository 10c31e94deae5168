"""What to compress and how: a quantizer, a sink policy and an outlier detector, composed.

:class:`Compression` holds the three components (built from Hydra config groups by the runners).
:class:`CompressionConfig` is the seed's flat set of knobs, kept for its Python API; it converts to a
:class:`Compression` of the ``uniform`` / ``fixed`` / ``ema_relative`` components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import registry
from .errors import check


@dataclass
class Compression:
    quantizer: Any = "none"
    sink: Any = "none"
    outlier: Any = "none"

    def __post_init__(self) -> None:
        self.quantizer = registry.create("quantizer", self.quantizer)
        self.sink = registry.create("sink", self.sink)
        self.outlier = registry.create("outlier", self.outlier)

    @property
    def enabled(self) -> bool:
        return bool(getattr(self.quantizer, "enabled", True))

    def check_shapes(self, head_dim: int, chunk_size: int | None = None) -> None:
        """Fail with a one-line error if the components cannot work on this model or chunk size."""
        if self.enabled:
            self.quantizer.check_shapes(head_dim, chunk_size)

    def describe(self) -> dict[str, str]:
        return {
            g: getattr(getattr(self, g), "registered_name", type(getattr(self, g)).__name__)
            for g in ("quantizer", "sink", "outlier")
        }


@dataclass
class CompressionConfig:
    """The seed's knobs (names and defaults as in its quick-start), plus the framework's extras."""

    chunk_size: int = 512
    ema_decay: float = 0.9
    attention_sink_size: int = 4
    key_bits_normal: int = 4
    value_bits_normal: int = 4
    key_bits_sink_outlier: int = 8
    value_bits_sink_outlier: int = 8
    outlier_threshold_relative: float = 3.0
    outlier_detection_enabled: bool = True
    quantizer_options: dict = field(default_factory=dict)  # extra UniformQuantizer fields, e.g. group sizes

    def __post_init__(self) -> None:
        check(self.chunk_size >= 1, f"chunk_size={self.chunk_size} must be >= 1")

    def to_compression(self) -> Compression:
        quantizer = {
            "name": "uniform",
            "key_bits": self.key_bits_normal,
            "value_bits": self.value_bits_normal,
            "rotate_keys": True,  # as conf/quantizer/uniform.yaml: the framework's defaults
            "rotate_values": True,
            **self.quantizer_options,
        }
        sink = {
            "name": "fixed",
            "size": self.attention_sink_size,
            "key_bits": self.key_bits_sink_outlier,
            "value_bits": self.value_bits_sink_outlier,
        }
        outlier = (
            {
                "name": "ema_relative",
                "threshold": self.outlier_threshold_relative,
                "ema_decay": self.ema_decay,
                "key_bits": self.key_bits_sink_outlier,
                "value_bits": self.value_bits_sink_outlier,
            }
            if self.outlier_detection_enabled
            else "none"
        )
        return Compression(quantizer, sink, outlier)
