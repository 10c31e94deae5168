"""streamkv: KV-cache compression during chunked prefill, composed from registered strategies."""

__version__ = "0.1.0"

from .cache import CompressedCache, CompressedLayer  # noqa: E402
from .compression import Compression, CompressionConfig  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .registry import register  # noqa: E402


def __getattr__(name):
    if name == "CompressedLlamaForCausalLM":  # imports the Llama model code only when asked for
        from .modeling import CompressedLlamaForCausalLM

        return CompressedLlamaForCausalLM
    raise AttributeError(name)


__all__ = [
    "CompressedCache",
    "CompressedLayer",
    "CompressedLlamaForCausalLM",
    "Compression",
    "CompressionConfig",
    "ConfigError",
    "register",
]
