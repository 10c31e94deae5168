"""streamkv: KV-cache compression during chunked prefill, composed from registered strategies.

``streamkv.kv`` is the engine (cache, codecs, transforms, attention backends; no Hydra). Importing
``streamkv`` or :class:`CompressedCache` loads only the engine; the lab's names (the registry, the
seed's API) load on first use.
"""

__version__ = "0.1.0"

from .kv.cache import CompressedCache, CompressedLayer  # noqa: E402
from .kv.compression import Compression  # noqa: E402
from .kv.errors import ConfigError  # noqa: E402

_LAB = {
    "CompressionConfig": ("compression", "CompressionConfig"),
    "build_compression": ("compression", "build_compression"),
    "register": ("registry", "register"),
    "registry": ("registry", None),
    "CompressedLlamaForCausalLM": ("modeling", "CompressedLlamaForCausalLM"),
    "CompressedModelForCausalLM": ("modeling", "CompressedModelForCausalLM"),
    "CompressedModel": ("modeling", "CompressedModel"),
    "compress": ("modeling", "compress"),
}


def __getattr__(name):
    if name not in _LAB:
        raise AttributeError(f"module 'streamkv' has no attribute {name!r}")
    import importlib

    module, attr = _LAB[name]
    mod = importlib.import_module(f"{__name__}.{module}")
    return mod if attr is None else getattr(mod, attr)


__all__ = ["CompressedCache", "CompressedLayer", "Compression", "ConfigError", *_LAB]
