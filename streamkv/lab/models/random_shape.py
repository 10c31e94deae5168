"""A random-weight model with a real model's shape: speed and memory measured where no weights can
be downloaded (the weights change what a model says, not how long it takes to say it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ...kv.errors import ConfigError, check, one_of
from ...kv.model_facts import read_facts
from ..registry import register
from . import embedded
from .causal_lm import DTYPES


@register("model", "random_shape")
@dataclass
class RandomShapeLM:
    """``config`` is the real model's ``config.json`` (its shape: the YAML option copies it);
    ``layers`` keeps only the first that many layers (a CPU cannot hold 8B fp32 weights). The
    tokenizer is the embedded model's: its ids are valid in any larger vocabulary."""

    name: str = "random"
    config: dict[str, Any] = field(default_factory=dict)
    layers: Optional[int] = None
    dtype: str = "bfloat16"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        one_of("model.dtype", self.dtype, [d for d in DTYPES if d != "auto"])
        one_of("model.device", self.device, ("cpu", "cuda", "auto"))
        check("model_type" in self.config, "model.config must name the model_type (a transformers config.json)")
        check(self.layers is None or self.layers >= 1, f"model.layers={self.layers} must be >= 1")

    def load(self):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        values = dict(self.config)
        kind = values.pop("model_type")
        try:
            config = AutoConfig.for_model(kind, **values)
        except ValueError as e:
            raise ConfigError(f"model.config: {str(e).splitlines()[0]}") from None
        if self.layers:
            config.num_hidden_layers = self.layers
            if getattr(config, "layer_types", None):
                config.layer_types = config.layer_types[: self.layers]
        read_facts(config)
        device = "cuda" if self.device == "auto" and torch.cuda.is_available() else ("cpu" if self.device == "auto" else self.device)
        torch.manual_seed(self.seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[self.dtype], attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(embedded.converted_dir())
        return model.eval(), tokenizer
