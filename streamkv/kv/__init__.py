"""The engine: what a serving stack needs to hold and read a compressed KV cache, and nothing of the lab.

The model facts (what each supported family's layers are), the cache and its layers, storage codecs and bit packing, transforms (Hadamard, RoPE), sparse
outliers, byte accounting, the components' contracts, and attention backends. No Hydra, no runners.
"""

from .cache import CompressedCache, CompressedLayer
from .compression import Compression
from .contracts import BringsOwnCache, OutlierDetector, Quantizer, SinkPolicy, StoredBlock
from .errors import ConfigError
from .model_facts import SUPPORTED_FAMILIES, LayerFacts, ModelFacts, facts_of, read_facts

__all__ = [
    "BringsOwnCache",
    "CompressedCache",
    "CompressedLayer",
    "Compression",
    "ConfigError",
    "LayerFacts",
    "ModelFacts",
    "OutlierDetector",
    "Quantizer",
    "SinkPolicy",
    "StoredBlock",
    "SUPPORTED_FAMILIES",
    "facts_of",
    "read_facts",
]
