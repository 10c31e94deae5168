"""The engine: what a serving stack needs to hold and read a compressed KV cache, and nothing of the lab.

The model facts (what each supported family's layers are), the cache and its layers, stored blocks and
bit packing (:mod:`.storage`), the quantizers, sink and outlier policies that decide what to store,
transforms (Hadamard, RoPE), the components' contracts, attention readers (:mod:`.attention`) and
compiled kernels (:mod:`.kernels`). No Hydra, no runners. Names load on first use, so a codec
(``streamkv.kv.storage``) imports with torch alone.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "CompressedCache": "cache",
    "CompressedLayer": "layer",
    "Compression": "compression",
    "ConfigError": "errors",
    "BringsOwnCache": "contracts",
    "OutlierDetector": "contracts",
    "Quantizer": "contracts",
    "SinkPolicy": "contracts",
    "StoredBlock": "contracts",
    "LayerFacts": "model_facts",
    "ModelFacts": "model_facts",
    "SUPPORTED_FAMILIES": "model_facts",
    "facts_of": "model_facts",
    "read_facts": "model_facts",
}


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)


__all__ = sorted(_NAMES)
