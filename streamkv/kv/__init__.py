"""The engine: what a serving stack needs to hold and read a compressed KV cache, and nothing of the lab.

The cache and its layers, storage codecs and bit packing, transforms (Hadamard, RoPE), sparse
outliers, byte accounting, the components' contracts, and attention backends. No Hydra, no runners.
"""

from .cache import CompressedCache, CompressedLayer
from .compression import Compression
from .contracts import BringsOwnCache, OutlierDetector, Quantizer, SinkPolicy, StoredBlock
from .errors import ConfigError

__all__ = [
    "BringsOwnCache",
    "CompressedCache",
    "CompressedLayer",
    "Compression",
    "ConfigError",
    "OutlierDetector",
    "Quantizer",
    "SinkPolicy",
    "StoredBlock",
]
