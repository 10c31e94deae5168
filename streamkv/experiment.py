"""One job: build the components from a composed config, run the task, write results.json.

Results go next to Hydra's ``.hydra/config.yaml`` in the run directory. A job whose results.json
already holds the same resolved config is skipped (``force=true`` re-runs it); a job that fails writes
``failed.json`` with its one-line error instead, so a sweep report can list it.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from . import registry
from .context import new_cache
from .kv.compression import Compression
from .context import RunContext
from .kv.errors import ConfigError, check
from .results import FAILED, RESULTS, git_revision, read_json, versions, write_json_atomic

log = logging.getLogger(__name__)

# keys of the composed config that describe the run, not the measurement (ignored when matching results)
_VOLATILE = ("force", "progress", "logger")


def comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _VOLATILE}


def chosen(choices: dict[str, Any]) -> dict[str, str]:
    """The config-group options picked for a job (components, experiment, ablation variant), not Hydra's own."""
    return {g: str(o) for g, o in choices.items() if o is not None and not g.startswith(("hydra", "schema"))}


def run_job(cfg: DictConfig, run_dir: str | Path, choices: dict[str, Any] | None = None, group: str | None = None) -> dict:
    """Run the job described by ``cfg`` in ``run_dir``; return its results (see module docstring)."""
    run_dir = Path(run_dir)
    try:
        results = _run(cfg, run_dir, dict(choices or {}), group)
    except BaseException as e:
        if isinstance(e, (ConfigError, Exception)):
            line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            write_json_atomic(run_dir / FAILED, {"error": line, "type": type(e).__name__})
        raise
    (run_dir / FAILED).unlink(missing_ok=True)
    return results


def _run(cfg: DictConfig, run_dir: Path, choices: dict[str, Any], group: str | None) -> dict:
    registry.load_builtins()
    config = OmegaConf.to_container(cfg, resolve=True)
    done = run_dir / RESULTS
    if done.is_file() and not cfg.get("force", False):
        previous = read_json(done)
        if comparable(previous.get("config", {})) == comparable(config):
            log.info("skipping: %s already holds results for this config (force=true re-runs)", done)
            previous["skipped"] = True
            return previous
    check(cfg.chunk_size >= 1, f"chunk_size={cfg.chunk_size} must be >= 1")
    parts = {g: registry.create(g, cfg[g]) for g in registry.GROUPS}
    compression = Compression(parts["quantizer"], parts["sink"], parts["outlier"], parts["attention"])
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    text = parts["data"].load()  # before the model: a bad file fails fast
    model, tokenizer = parts["model"].load()
    new_cache(model, compression, cfg.chunk_size)  # fail early on an unusable combination
    ctx = RunContext(model, tokenizer, compression, cfg.chunk_size, lambda: text, progress=cfg.get("progress", True))

    task_name = choices.get("task", getattr(parts["task"], "registered_name", "task"))
    logger = parts["logger"]
    logger.start(
        config=config,
        run_dir=str(run_dir),
        name=run_dir.name,
        group=group,
        job_type=task_name,
        tags=[f"{g}:{option}" for g, option in chosen(choices).items() if g not in ("task", "logger")],
    )
    try:
        t0 = time.perf_counter()
        out = parts["task"].run(ctx)
        results: dict[str, Any] = {
            "task": task_name,
            "model": parts["model"].name,
            "components": {**{g: choices.get(g) for g in registry.GROUPS}, **chosen(choices)},
            "chunk_size": cfg.chunk_size,
            **out,
            "wall_seconds": time.perf_counter() - t0,
            "config": config,
            "versions": versions(),
            "git": git_revision(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(done, results)
        logger.log(results)
    finally:
        logger.finish()
    return results


def summary(results: dict, run_dir: str | Path) -> str:
    """A few human lines: the headline metrics and where the results are."""
    lines = []
    m, s, c = results.get("metrics", {}), results.get("speed", {}), results.get("compression")
    if "ppl" in m:
        lines.append(f"ppl {m['ppl']:.3f} over {m['tokens']} tokens ({m.get('windows', '?')} windows)")
    for name, value in m.items():
        if name not in ("ppl", "nll", "tokens", "windows") and isinstance(value, (int, float)):
            lines.append(f"{name} {value:.4g}")
    if s:
        rate = f", {s['prefill_tokens_per_s']:.0f} prefill tokens/s" if "prefill_tokens_per_s" in s else ""
        lines.append(f"{s.get('seconds', 0):.1f} s{rate}")
    if c:
        lines.append(
            f"KV cache: {c['avg_key_bits']:.2f} key bits, {c['avg_value_bits']:.2f} value bits, "
            f"{c['kv_bytes'] / 2**20:.2f} MiB vs {c['kv_bytes_fp16'] / 2**20:.2f} MiB fp16 ({c['compression_ratio']:.2f}x)"
        )
    if results.get("skipped"):
        lines.append("(skipped: results for this config were already there)")
    lines.append(f"results: {Path(run_dir) / RESULTS}")
    return "\n".join(lines)
