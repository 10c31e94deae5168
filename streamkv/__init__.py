"""streamkv: KV-cache compression during chunked prefill, composed from registered strategies.

``streamkv.kv`` is the engine (cache, codecs, transforms, attention readers; no Hydra); ``streamkv.lab``
the experiment framework over it. Names load on first use: ``streamkv.CompressedCache`` loads only the
engine, the lab's names (the registry, the seed's API) load the lab.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_NAMES = {
    "CompressedCache": ("kv.cache", "CompressedCache"),
    "CompressedLayer": ("kv.layer", "CompressedLayer"),
    "Compression": ("kv.compression", "Compression"),
    "ConfigError": ("kv.errors", "ConfigError"),
    "CompressionConfig": ("lab.compression", "CompressionConfig"),
    "build_compression": ("lab.compression", "build_compression"),
    "register": ("lab.registry", "register"),
    "registry": ("lab.registry", None),
    "CompressedLlamaForCausalLM": ("lab.modeling", "CompressedLlamaForCausalLM"),
    "CompressedModelForCausalLM": ("lab.modeling", "CompressedModelForCausalLM"),
    "CompressedModel": ("lab.modeling", "CompressedModel"),
    "compress": ("lab.modeling", "compress"),
}


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'streamkv' has no attribute {name!r}")
    module, attr = _NAMES[name]
    mod = importlib.import_module(f"{__name__}.{module}")
    return mod if attr is None else getattr(mod, attr)


__all__ = sorted(_NAMES)
