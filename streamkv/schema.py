"""The primary config's schema: the top-level knobs, typed, beside one node per component group."""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class EvalConfig:
    name: str = "eval"  # the experiment or sweep name: the W&B group and the sweep directory
    chunk_size: int = 512  # tokens per prefill chunk (the seed's knob)
    seed: int = 0
    force: bool = False  # re-run even if the run dir already holds results for this config
    progress: bool = True
    model: Any = None
    data: Any = None
    task: Any = None
    quantizer: Any = None
    sink: Any = None
    outlier: Any = None
    attention: Any = None
    logger: Any = None


ConfigStore.instance().store(group="schema", name="eval", node=EvalConfig, provider="streamkv")
