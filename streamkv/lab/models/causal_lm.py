"""The ``model`` config group's schema, and loading a causal LM with its tokenizer from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError

from ...kv.errors import ConfigError, one_of
from ...kv.model_facts import read_facts, set_max_positions
from ..registry import register
from ..runs import network
from . import embedded

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


@register("model", "causal_lm")
@dataclass
class CausalLM:
    """A causal LM: ``path`` is a hub id, a local directory or a ``.gguf`` file; empty = the embedded model."""

    name: str = "smollm2-135m-instruct"
    path: Optional[str] = None
    dtype: str = "float32"
    device: str = "cpu"  # cpu | cuda | auto (cuda when available)
    device_map: Optional[str] = None  # e.g. "auto" to shard a large model over GPUs
    attn_implementation: str = "sdpa"
    cache_dir: Optional[str] = None  # where the embedded model is converted to (default ~/.cache/streamkv)
    max_positions: Optional[int] = None  # override the model's maximum positions

    def __post_init__(self) -> None:
        one_of("model.dtype", self.dtype, DTYPES)
        one_of("model.device", self.device, ("cpu", "cuda", "auto"))
        self._config = None

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def source(self) -> tuple[str, dict]:
        """(what to pass to from_pretrained, extra kwargs), resolving the embedded model and GGUF files."""
        if not self.path or self.path in embedded.SHORT_NAMES:
            return str(embedded.converted_dir(self.cache_dir)), {}
        p = Path(self.path).expanduser()
        if p.suffix == ".gguf":
            if not p.is_file():
                raise ConfigError(f"model.path={self.path} does not exist")
            return str(p.parent), {"gguf_file": p.name}
        if p.exists() or self.path.startswith((".", "/", "~")):
            if not p.is_dir():
                raise ConfigError(f"model.path={self.path} is not a model directory or a .gguf file")
            return str(p), {}
        network.use_hub()  # a hub id: give up in seconds if the hub does not answer
        return self.path, {}

    def config(self):
        """The model's transformers config, read once (no weights) and checked: a causal LM of a family
        the cache handles. What fails here fails before any weights load."""
        if self._config is None:
            from transformers import AutoConfig

            where, extra = self.source()
            try:
                config = AutoConfig.from_pretrained(where, **extra)
            except Exception as e:  # noqa: BLE001 - any failure here means "not a model we can read"
                offline = network.hub_offline()
                why = f" (offline: {offline})" if offline and not Path(where).exists() else ""  # a hub id
                raise ConfigError(f"model.path={self.path or where} is not a loadable model{why}: {_first_line(e)}") from None
            if _causal_lm_class(config) is None:
                raise ConfigError(f"model.path={self.path or where} is not a causal language model (model_type={config.model_type!r})")
            self._facts = read_facts(config)  # an unsupported family or feature fails here
            self._config = config
        return self._config

    def positions(self) -> int | None:
        """How many positions the model takes (``max_positions`` overrides its config's)."""
        self.config()
        return self.max_positions or self._facts.max_positions

    def load(self):
        """(model in eval mode, tokenizer); user mistakes become one-line :class:`ConfigError`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # loading takes half a second; its bar is noise
        where, extra = self.source()
        config = self.config()
        model_class = _causal_lm_class(config)
        attn = self.attn_implementation
        if attn == "sdpa" and not getattr(model_class, "_supports_sdpa", True):
            attn = "eager"  # e.g. Gemma-2 (attention logit soft-capping)
        kwargs = dict(extra, dtype=DTYPES[self.dtype], attn_implementation=attn)
        if self.device_map:
            kwargs["device_map"] = self.device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(where, config=config, **kwargs)
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                raise ConfigError(
                    f"model.path={self.path or where} is not a causal language model (model_type={config.model_type!r})"
                ) from None
            raise
        except (OSError, SafetensorError) as e:  # a missing or corrupt file
            hint = " (the converted cache may be corrupt: delete it to rebuild)" if not self.path else ""
            raise ConfigError(f"cannot load model from {where}{hint}: {_first_line(e)}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, **extra)
        except Exception as e:  # noqa: BLE001 - missing or unreadable tokenizer files fail in many ways
            raise ConfigError(f"model.path={self.path or where} has no usable tokenizer: {_first_line(e)}") from None
        if not self.device_map:
            model.to(self.resolved_device())
        if self.max_positions:
            set_max_positions(model, self.max_positions)
        model.eval()
        return model, tokenizer


def _causal_lm_class(config):
    """The class ``AutoModelForCausalLM`` would build for ``config`` (None: not a causal LM)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
