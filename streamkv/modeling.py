"""The seed's Python API: ``CompressedLlamaForCausalLM``.

A plain ``LlamaForCausalLM`` (no model code is patched) whose ``generate`` streams the prompt in
``chunk_size`` chunks into a :class:`~streamkv.kv.cache.CompressedCache` and decodes through it, and
whose ``get_compression_stats`` reports what that cache really holds.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaForCausalLM

from .kv.cache import CompressedCache
from .compression import CompressionConfig
from .kv.errors import ConfigError
from .models import embedded


class CompressedLlamaForCausalLM(LlamaForCausalLM):
    compression_config: CompressionConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, compression_config: CompressionConfig | None = None, **kwargs):
        """Like ``LlamaForCausalLM.from_pretrained``; also takes the embedded model's short name
        (``"smollm2-135m"``) and the seed's ``torch_dtype=`` spelling."""
        if str(pretrained_model_name_or_path) in embedded.SHORT_NAMES:
            pretrained_model_name_or_path = embedded.converted_dir()
        if "torch_dtype" in kwargs:
            kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.set_compression(compression_config or CompressionConfig())
        return model

    def set_compression(self, config: CompressionConfig) -> None:
        self.compression_config = config
        self.compression = config.to_compression()
        self._last_cache: CompressedCache | None = None
        self.new_cache()  # validates the combination against this model now, not at generate time

    def new_cache(self) -> CompressedCache:
        return CompressedCache.for_model(self, self.compression, self.compression_config.chunk_size)

    def generate(self, *args, **kwargs):
        """``generate`` with a fresh compressed cache and chunked prefill, unless the caller passes a cache."""
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs["cache"] = self.new_cache()
        kwargs.setdefault("prefill_chunk_size", self.compression_config.chunk_size)
        self._last_cache = kwargs.get("cache") or kwargs.get("past_key_values")
        return super().generate(*args, **kwargs)

    def get_compression_stats(self) -> dict[str, Any]:
        """Stats of the cache used by the last ``generate`` (see :meth:`CompressedCache.stats`)."""
        if self._last_cache is None:
            raise ConfigError("no generation has run yet: call generate() before get_compression_stats()")
        return self._last_cache.stats()
