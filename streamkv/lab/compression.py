"""Composing a :class:`~streamkv.kv.compression.Compression` from registered components.

:func:`compose` builds the three components from names, dicts or composed config nodes (the lab's
side of the engine's :class:`Compression`). :class:`CompressionConfig` is the seed's flat set of
knobs, kept for its Python API; it converts to ``uniform`` / ``fixed`` / ``ema_relative`` components.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..kv.compression import Compression
from ..kv.errors import ConfigError, check
from . import registry


def build_compression(quantizer: Any = "none", sink: Any = "none", outlier: Any = "none", attention: Any = "auto") -> Compression:
    """A :class:`Compression` from registered names, ``{"name": ..., **fields}`` dicts, composed config
    nodes or ready components."""
    parts = {"quantizer": quantizer, "sink": sink, "outlier": outlier, "attention": attention}
    return Compression(**{g: registry.create(g, spec) for g, spec in parts.items()})


def describe(compression: Compression) -> dict[str, str]:
    """The registered name of each component."""
    return {g: registry.name_of(getattr(compression, g)) for g in ("quantizer", "sink", "outlier", "attention")}


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
        """Build the components now, so a bad value fails here (not after the weights load), named as the seed names it."""
        check(self.chunk_size >= 1, f"chunk_size={self.chunk_size} must be >= 1")
        try:
            self.to_compression()
        except ConfigError as e:
            raise ConfigError(_SEED_KEY.sub(lambda m: SEED_NAMES[m.group(0)], str(e), count=1)) from None

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
        return build_compression(quantizer, sink, outlier)


# the components' field names as the seed's CompressionConfig spells them (its errors name the seed's)
SEED_NAMES = {
    "quantizer.key_bits": "key_bits_normal",
    "quantizer.value_bits": "value_bits_normal",
    "sink.size": "attention_sink_size",
    "sink.key_bits": "key_bits_sink_outlier",
    "sink.value_bits": "value_bits_sink_outlier",
    "outlier.key_bits": "key_bits_sink_outlier",
    "outlier.value_bits": "value_bits_sink_outlier",
    "outlier.threshold": "outlier_threshold_relative",
    "outlier.ema_decay": "ema_decay",
}
_SEED_KEY = re.compile("|".join(re.escape(k) for k in SEED_NAMES))
