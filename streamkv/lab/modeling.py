"""The seed's Python API: ``CompressedLlamaForCausalLM``, and the same for every supported family.

``CompressedLlamaForCausalLM`` is a plain ``LlamaForCausalLM`` (no model code is patched) whose
``generate`` streams the prompt in ``chunk_size`` chunks into a
:class:`~streamkv.kv.cache.CompressedCache` and decodes through it, and whose
``get_compression_stats`` reports what that cache really holds.

For any other supported family (see :data:`streamkv.kv.model_facts.SUPPORTED_FAMILIES`),
:func:`compress` puts the same two methods around a loaded model, and
:meth:`CompressedModelForCausalLM.from_pretrained` loads one (its family is checked from the config
before any weights load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM

from ..kv.cache import CompressedCache
from ..kv.errors import ConfigError, check
from ..kv.model_facts import max_positions, read_facts
from .compression import CompressionConfig
from .models import embedded
from .runs import network


def _resolve(name_or_path, kwargs: dict):
    """The embedded model's short name (``"smollm2-135m"``) and the seed's ``torch_dtype=`` spelling;
    a hub id goes through the bounded probe (:func:`streamkv.lab.runs.network.use_hub`) first."""
    if str(name_or_path) in embedded.SHORT_NAMES:
        name_or_path = embedded.converted_dir()
    elif not Path(str(name_or_path)).expanduser().exists():
        network.use_hub()
    if "torch_dtype" in kwargs:
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    return name_or_path


class _Streams:
    """``generate`` through a fresh compressed cache with chunked prefill, and the stats of the last one.

    Needs ``_model`` (the transformers model) and ``compression_config``.
    """

    compression_config: CompressionConfig
    _last_cache: Any

    def _attach(self, config: CompressionConfig | None) -> None:
        self.compression_config = config or CompressionConfig()
        self.compression = self.compression_config.to_compression()
        self._last_cache = None
        self.new_cache()  # validates the combination against this model now, not at generate time

    def new_cache(self) -> CompressedCache:
        return CompressedCache.for_model(self._model, self.compression, self.compression_config.chunk_size)

    def _generate_kwargs(self, args: tuple, kwargs: dict) -> dict:
        """The cache and chunking for ``generate``, after refusing an empty prompt or one (plus
        ``max_new_tokens``) beyond the model's positions: attention would fail on the first, and RoPE
        run silently past its range on the second."""
        self._check_prompt(args[0] if args else kwargs.get("input_ids", kwargs.get("inputs")), kwargs.get("max_new_tokens"))
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs["cache"] = self.new_cache()
        kwargs.setdefault("prefill_chunk_size", self.compression_config.chunk_size)
        self._last_cache = kwargs.get("cache") or kwargs.get("past_key_values")
        return kwargs

    def _check_prompt(self, ids, max_new_tokens: int | None) -> None:
        if ids is None or not hasattr(ids, "shape"):
            return  # inputs_embeds or something generate itself validates
        length = ids.shape[-1] if ids.dim() else 0
        check(ids.numel() > 0 and length > 0, f"the prompt is empty (input_ids of shape {tuple(ids.shape)}); pass at least one token")
        positions = max_positions(self._model)
        total = length + (max_new_tokens or 0)
        check(
            positions is None or total <= positions,
            f"the prompt has {length} tokens" + (f" and max_new_tokens={max_new_tokens}" if max_new_tokens else "")
            + f": {total} > the model's {positions} positions; shorten the prompt",
        )

    def get_compression_stats(self) -> dict[str, Any]:
        """Stats of the cache used by the last ``generate`` (see :meth:`CompressedCache.stats`)."""
        if self._last_cache is None:
            raise ConfigError("no generation has run yet: call generate() before get_compression_stats()")
        return self._last_cache.stats()


class CompressedLlamaForCausalLM(_Streams, LlamaForCausalLM):
    @property
    def _model(self):
        return self

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, compression_config: CompressionConfig | None = None, **kwargs):
        """Like ``LlamaForCausalLM.from_pretrained``; also takes the embedded model's short name
        (``"smollm2-135m"``) and the seed's ``torch_dtype=`` spelling."""
        pretrained_model_name_or_path = _resolve(pretrained_model_name_or_path, kwargs)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.set_compression(compression_config or CompressionConfig())
        return model

    def set_compression(self, config: CompressionConfig) -> None:
        self._attach(config)

    def generate(self, *args, **kwargs):
        """``generate`` with a fresh compressed cache and chunked prefill, unless the caller passes a cache."""
        return super().generate(*args, **self._generate_kwargs(args, kwargs))


class CompressedModel(_Streams):
    """A loaded causal LM of any supported family with the seed's compressed ``generate`` and
    ``get_compression_stats``; everything else (forward, ``config``, ``device``, ...) is the model's own.
    Build it with :func:`compress` or :meth:`CompressedModelForCausalLM.from_pretrained`."""

    def __init__(self, model: torch.nn.Module, config: CompressionConfig | None = None):
        self.model = model
        self._attach(config)

    @property
    def _model(self):
        return self.model

    def generate(self, *args, **kwargs):
        """The model's ``generate`` with a fresh compressed cache and chunked prefill, unless the caller passes a cache."""
        return self.model.generate(*args, **self._generate_kwargs(args, kwargs))

    def set_compression(self, config: CompressionConfig) -> None:
        self._attach(config)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        if name == "model":  # not yet set (during unpickling)
            raise AttributeError(name)
        return getattr(self.model, name)


def compress(model: torch.nn.Module, config: CompressionConfig | None = None) -> CompressedModel:
    """``model`` (a loaded causal LM of a supported family) generating through a compressed cache."""
    return CompressedModel(model, config)


class CompressedModelForCausalLM:
    """The family-neutral ``CompressedLlamaForCausalLM``: ``from_pretrained`` loads any supported family."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, compression_config: CompressionConfig | None = None, **kwargs) -> CompressedModel:
        """Like ``AutoModelForCausalLM.from_pretrained`` (also the embedded model's short name and
        ``torch_dtype=``); an unsupported family fails on its config, before any weights load."""
        from transformers import AutoConfig, AutoModelForCausalLM

        path = _resolve(pretrained_model_name_or_path, kwargs)
        config = kwargs.pop("config", None)
        if config is None:
            where = {k: kwargs[k] for k in ("gguf_file", "revision", "trust_remote_code", "cache_dir") if k in kwargs}
            config = AutoConfig.from_pretrained(path, **where)
        read_facts(config)  # an unsupported family fails here, before any weights load
        model = AutoModelForCausalLM.from_pretrained(path, *args, config=config, **kwargs)
        return compress(model.eval(), compression_config)
