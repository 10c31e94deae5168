"""The primary config's schema: the top-level knobs, typed, beside one node per component group.

Hydra refuses an unknown key given as ``key=value`` but adds one given as ``+key=value`` even to a
typed config; :func:`check_keys` refuses those after composition, and :func:`valid_keys` is what
every unknown-key error lists.
"""

from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..kv.errors import check


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


def valid_keys(schema: Any) -> list[str]:
    """The field names of a dataclass schema (or its instance); [] for anything else."""
    return [f.name for f in fields(schema)] if is_dataclass(schema) else []


def check_keys(cfg: DictConfig) -> None:
    """Fail on a key that no schema declares (added with ``+``), listing the valid ones."""
    _check_node(cfg, EvalConfig, "")
    for group in valid_keys(EvalConfig):
        node = cfg.get(group)
        if isinstance(node, DictConfig) and is_dataclass(OmegaConf.get_type(node)):
            _check_node(node, OmegaConf.get_type(node), f"{group}.")


def _check_node(node: DictConfig, schema: type, prefix: str) -> None:
    unknown = [k for k in node if k not in valid_keys(schema)]
    check(not unknown, unknown_key(f"{prefix}{unknown[0]}" if unknown else "", schema))


def unknown_key(key: str, schema: Any) -> str:
    """The one-line error for ``key`` missing from ``schema`` (a dataclass), listing the valid keys."""
    group, _, _ = key.rpartition(".")
    where = f"{group} ({schema.__name__})" if group else "the top level"
    return f"unknown key '{key}'; valid keys at {where}: {valid_keys(schema)}"
