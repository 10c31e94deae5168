"""One job: build the components from a composed config, run the task, write results.json.

Results go next to Hydra's ``.hydra/config.yaml`` in the run directory, which the job holds
(:func:`streamkv.lab.runs.rundir.claim`) from the check below until its results are written. A directory
whose results.json holds the same resolved config is skipped (``force=true`` re-runs it); one whose
results.json holds another config is refused, untouched. A job that fails writes ``failed.json``
(its one-line error, and why: see :mod:`streamkv.lab.runs.results`) instead, so a sweep report can list it.
Everything that can be checked from the config and the text is checked before the weights load.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ...kv.compression import Compression
from ...kv.errors import check
from .. import registry, schema
from ..context import RunContext, new_cache
from . import rundir
from .results import FAILED, RESULTS, failure, git_revision, read_json, versions, write_json_atomic

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
    registry.load_builtins()
    with rundir.claim(run_dir) as run_dir:
        config = OmegaConf.to_container(cfg, resolve=True)
        previous = _previous(run_dir, config)
        if previous is not None and not cfg.get("force", False):
            log.info("skipping: %s already holds results for this config (force=true re-runs)", run_dir / RESULTS)
            return {**previous, "skipped": True}
        try:
            results = _run(cfg, config, run_dir, dict(choices or {}), group)
        except BaseException as e:
            _record_failure(run_dir, e)
            raise
        (run_dir / FAILED).unlink(missing_ok=True)
    return results


def _previous(run_dir: Path, config: dict) -> dict | None:
    """The results already in ``run_dir`` for this config; another config's results are refused."""
    done = run_dir / RESULTS
    if not done.is_file():
        return None
    previous = read_json(done)
    check(
        comparable(previous.get("config", {})) == comparable(config),
        f"{run_dir} already holds {RESULTS} of another config; choose another directory "
        "(hydra.run.dir=... / hydra.sweep.dir=...) or move that one away",
    )
    return previous


def _record_failure(run_dir: Path, e: BaseException) -> None:
    """Write failed.json for ``e``; where the failure log is kept rides on the exception for the one-line error."""
    try:
        write_json_atomic(run_dir / FAILED, failure(e))
        e.failed_json = str(run_dir / FAILED)
    except OSError:  # the directory itself is what failed: the one-line error says so
        pass


def _run(cfg: DictConfig, config: dict, run_dir: Path, choices: dict[str, Any], group: str | None) -> dict:
    schema.check_keys(cfg)
    check(cfg.chunk_size >= 1, f"chunk_size={cfg.chunk_size} must be >= 1")
    parts = {g: registry.create(g, cfg[g]) for g in registry.GROUPS}
    compression = Compression(parts["quantizer"], parts["sink"], parts["outlier"], parts["attention"])
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    text = parts["data"].load()  # before the model: a bad file fails fast
    _precheck(parts["task"], parts["model"].positions(), text, compression)
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
        write_json_atomic(run_dir / RESULTS, results)
        logger.log(results)
    finally:
        logger.finish()
    return results


def _precheck(task, positions: int | None, text: str, compression: Compression) -> None:
    """The task's checks against the model's positions (from its config) and the raw text, before the
    weights load; then the sinks must leave room in the longest sequence the task feeds."""
    if not hasattr(task, "precheck"):
        return
    longest = task.precheck(positions, text)
    sinks = getattr(compression.sink, "size", 0)
    check(
        sinks < longest,
        f"sink.size={sinks} is not smaller than the longest sequence ({longest} tokens): every token would be "
        f"stored twice, as a sink and in its group; choose sink.size < {longest}",
    )


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
