"""What a benchmark run does: its config (methods as overrides of the ``eval`` config, widths,
measures), each method's composed compression, and the (method, width) jobs in order."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ...kv.compression import Compression
from ...kv.errors import ConfigError, check
from .. import registry
from ..paths import CONF_DIR


@dataclass
class MethodSpec:
    label: str = ""
    overrides: list[str] = field(default_factory=list)  # overrides of the eval config; "{bits}" = the width
    bits: list[int] = field(default_factory=list)


@dataclass
class BenchConfig:
    name: str = "bench"
    model: Any = None
    data: Any = None
    chunk_size: int = 512  # tokens per prefill chunk, everywhere
    window: int = 2048  # perplexity windows ...
    max_windows: Optional[int] = 8  # ... and how many
    prefill_tokens: Optional[int] = None  # the long prompt; null = the model's max_position_embeddings
    decode_context: int = 4096  # context the decode throughput is measured at
    decode_tokens: int = 64  # tokens decoded per timed decode run
    decode_batch: int = 1  # sequences decoded together (the same prompt, batch x)
    answer_context: int = 4096  # measure=[answer]: a question on a prompt this long (prefill + answer) ...
    answer_tokens: int = 32  # ... answered in this many greedy tokens, end to end
    repeats: int = 3  # timed runs per measurement (median)
    measure: list[str] = field(default_factory=lambda: ["ppl", "prefill", "decode"])
    reference: str = "baseline"  # the method Δppl is computed against, run first when ppl is measured
    # (speed is always paired with transformers' DynamicCache)
    run: list[str] = field(default_factory=list)  # methods to run, in order; empty = all
    bits: Optional[list[int]] = None  # keep only these widths of methods that have a {bits} placeholder
    speed_bits: Optional[list[int]] = None  # measure speed/memory only at these widths (null = all)
    # name -> a MethodSpec's fields, typed where a method is read (method_spec): OmegaConf cannot add an
    # entry to a dict of dataclasses, and '+methods.NAME={...}' on the command line must be able to
    methods: dict[str, Any] = field(default_factory=dict)
    threads: Optional[int] = None  # torch.set_num_threads; null = torch's default
    kl_cache_mb: int = 1024  # reference log-probs kept across methods (KL needs them; 2 windows of SmolLM2 fit)
    soak_sequences: int = 12  # measure=[soak]: sequences through a fresh cache each, in one process ...
    soak_tokens: int = 1024  # ... of this many prompt tokens (in chunk_size chunks) ...
    soak_decode: int = 4  # ... and decoded tokens; resident memory after each, once the cache is dropped
    seed: int = 0
    progress: bool = True


ConfigStore.instance().store(group="schema", name="bench", node=BenchConfig, provider="streamkv")

MEASURES = ("ppl", "prefill", "decode", "answer", "soak")


def compose_eval(overrides: list[str], conf_dir: str | os.PathLike = CONF_DIR) -> DictConfig:
    """The ``eval`` config composed with ``overrides`` (inside a Hydra app, through its search path)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .. import schema  # noqa: F401  (the eval schema)

    registry.load_builtins()  # the components' schemas
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="eval", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


def compression_for(overrides: list[str], conf_dir: str | os.PathLike = CONF_DIR) -> tuple[Compression, dict]:
    """The composed compression and its resolved config (quantizer, sink, outlier)."""
    cfg = compose_eval(overrides, conf_dir)
    groups = ("quantizer", "sink", "outlier", "attention")
    resolved = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in groups}
    return Compression(*(registry.create(g, cfg[g]) for g in groups)), resolved


def method_spec(cfg: BenchConfig, name: str) -> MethodSpec:
    """Method ``name`` of ``cfg``, its fields checked (a missing one takes its default)."""
    spec = cfg.methods[name]
    if isinstance(spec, MethodSpec):
        return spec
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MethodSpec), spec))
    except (OmegaConfBaseException, ValueError) as e:  # a wrong key or type; ValueError: not a mapping at all
        has = ", ".join(f.name for f in fields(MethodSpec))
        raise ConfigError(f"methods.{name}: {str(e).splitlines()[0]} (a method has {has})") from None


@dataclass
class Job:
    method: str
    label: str
    bits: int
    overrides: list[str]
    speed: bool


def plan(cfg: BenchConfig) -> list[Job]:
    """The (method, bits) jobs of ``cfg``, the reference method first."""
    names = list(cfg.run) or list(cfg.methods)
    unknown = [n for n in [*names, cfg.reference] if n not in cfg.methods]
    check(not unknown, f"unknown bench method(s) {unknown}; methods: {sorted(cfg.methods)}")
    if "ppl" in cfg.measure:  # Δppl needs the reference, first
        if cfg.reference in names:
            names.remove(cfg.reference)
        names.insert(0, cfg.reference)
    jobs = []
    for name in names:
        spec = method_spec(cfg, name)
        templated = any("{bits}" in o for o in spec.overrides)
        widths = list(spec.bits) or [0]
        if templated and cfg.bits is not None and name != cfg.reference:
            widths = [b for b in widths if b in cfg.bits]
        for b in widths:
            speed = not templated or cfg.speed_bits is None or b in cfg.speed_bits
            jobs.append(Job(name, spec.label or name, b, [o.replace("{bits}", str(b)) for o in spec.overrides], speed))
    return jobs
