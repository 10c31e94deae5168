"""Side-by-side benchmark of KV-cache methods: quality, memory and speed in one run.

Each *method* is a list of overrides of the ``eval`` config (usually one ``experiment=<preset>``, plus
``{bits}`` placeholders for its bit widths), so peers are registered strategies composed exactly like
ours. For every method at every bit width the benchmark measures, on one loaded model and text:

* **quality** - streaming perplexity (the :class:`~streamkv.lab.tasks.perplexity.Perplexity` task:
  windows fed in chunks through the cache) and its change against the ``reference`` method;
* **memory** - average stored key/value bits and ``kv_bytes`` of the cache after a window, counted
  from the tensors it holds; ``kv_bytes`` again after the long prefill; the process's peak resident
  memory during that prefill (VmHWM, reset before it) and ``torch.cuda.max_memory_allocated`` on GPU;
* **speed** - prefill throughput of a long prompt (the model's maximum length) fed in chunks through
  the method's cache, and decode throughput (greedy, one token per forward) at a ``decode_context``
  token context, in tokens/s, median of ``repeats``. Each timed run is paired with the same run
  through transformers' uncompressed ``DynamicCache`` just before it, and ratios are medians of
  the per-pair ratios, so load on a shared machine affects both sides of a ratio alike.

Results go to the run directory: ``bench.md`` (table), ``bench.csv``, ``bench.json`` and
``bench_pareto.png`` (perplexity against average bits). A method that raises is reported with its
error (``crashed``), one whose backend package is missing as ``skipped``; neither stops the others."""

from __future__ import annotations

import gc
import logging
import math
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ...kv.errors import ConfigError, check
from ...kv.model_facts import max_positions
from .. import registry
from ..context import RunContext, new_cache
from ..runs.results import git_revision, versions, write_json_atomic
from ..tasks.perplexity import Perplexity
from .measure import SpeedReference, measure_soak, measure_speed, warm_up
from .plan import MEASURES, BenchConfig, compression_for, plan
from .render import markdown, pareto_plot, write_csv

log = logging.getLogger(__name__)

SPEED_REFERENCE = "DynamicCache"


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def run_bench(cfg: BenchConfig | DictConfig, run_dir: str | os.PathLike, command: str | None = None) -> dict:
    """Run the benchmark described by ``cfg``; write the table, CSV, JSON and plot to ``run_dir``."""
    registry.load_builtins()
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in cfg.measure if m not in MEASURES]
    check(not unknown, f"measure={cfg.measure}: unknown {unknown}; choose from {list(MEASURES)}")
    check(cfg.repeats >= 1, f"repeats={cfg.repeats} must be >= 1")
    jobs = plan(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    model_spec = registry.create("model", cfg.model)
    data = registry.create("data", cfg.data)
    text = data.load()
    model, tokenizer = model_spec.load()
    device = next(model.parameters()).device
    limit = max_positions(model)
    n_prompt = cfg.prefill_tokens or limit
    check(n_prompt is not None, "prefill_tokens must be set: the model does not say its maximum positions")
    check(limit is None or n_prompt <= limit, f"prefill_tokens={n_prompt} exceeds the model's {limit} positions")
    speed_wanted = any(m in cfg.measure for m in ("prefill", "decode", "answer")) and any(j.speed for j in jobs)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if speed_wanted:
        check(len(ids) > n_prompt, f"the text has {len(ids)} tokens, fewer than prefill_tokens={n_prompt} + 1")
        check(
            "decode" not in cfg.measure or cfg.decode_context < n_prompt,
            f"decode_context={cfg.decode_context} must be shorter than the prompt (prefill_tokens={n_prompt})",
        )
        check(
            cfg.decode_context + cfg.decode_tokens * (cfg.repeats + 1) + 2 <= (limit or math.inf),
            f"decode_context={cfg.decode_context} plus {cfg.repeats + 1} x {cfg.decode_tokens} decoded tokens "
            f"exceeds the model's {limit} positions",
        )
        check(
            "answer" not in cfg.measure or cfg.answer_context <= n_prompt,
            f"answer_context={cfg.answer_context} must not exceed the prompt (prefill_tokens={n_prompt})",
        )
    prompt = ids[:n_prompt]
    ptask = Perplexity(window=cfg.window, max_windows=cfg.max_windows, mode="stream", kl_cache_mb=cfg.kl_cache_mb)

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    revision = git_revision()  # at the start: the code that runs (compositions are re-read per job)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    ref = SpeedReference(model, prompt, cfg) if speed_wanted else None
    if ref is not None:
        warm_up(model, prompt, ref.new, cfg.chunk_size)

    rows: list[dict[str, Any]] = []
    for i, job in enumerate(jobs):
        row: dict[str, Any] = {"method": job.method, "label": job.label, "bits": job.bits, "status": "ok", "overrides": " ".join(job.overrides)}
        rows.append(row)
        log.info("[%d/%d] %s bits=%s", i + 1, len(jobs), job.method, job.bits)
        t0 = time.perf_counter()
        try:
            compression, row["resolved"] = compression_for(job.overrides)
            reason = getattr(compression.quantizer, "missing", lambda: None)()
            if reason:
                row["status"], row["error"] = "skipped", reason
                continue
            make_cache = lambda: new_cache(model, compression, cfg.chunk_size)  # noqa: E731
            make_cache()  # fail early on an unusable combination
            row["describe"] = getattr(compression.quantizer, "describe", lambda: "")()
            if "ppl" in cfg.measure:
                ctx = RunContext(model, tokenizer, compression, cfg.chunk_size, lambda: text, progress=cfg.progress)
                res = ptask.run(ctx)
                row.update(ppl=res["metrics"]["ppl"], ppl_tokens=res["metrics"]["tokens"], ppl_seconds=res["speed"]["seconds"])
                row.update({k: res["metrics"][k] for k in ("kl", "kl_p99", "top1_agreement") if k in res["metrics"]})
                stats = res.get("compression") or {}
                for k in ("avg_key_bits", "avg_value_bits", "avg_bits", "kv_bytes", "kv_bytes_fp16", "compression_ratio",
                          "key_outlier_fraction", "value_outlier_fraction"):
                    if k in stats:
                        row[k] = stats[k]
            if job.speed and ref is not None:
                warm_up(model, prompt, make_cache, cfg.chunk_size)
                row.update(measure_speed(model, prompt, make_cache, cfg, ref))
            if "soak" in cfg.measure:
                row.update(measure_soak(model, ids, make_cache, cfg))
        except (ConfigError, Exception) as e:  # noqa: BLE001 - a peer that crashes is reported, not hidden
            row["status"], row["error"] = "crashed", _one_line(e)
            log.warning("%s bits=%s crashed: %s", job.method, job.bits, row["error"])
            log.debug("%s", traceback.format_exc())
        finally:
            row["seconds"] = time.perf_counter() - t0
            gc.collect()
            write_json_atomic(run_dir / "bench.partial.json", {"rows": rows})  # progress, should the run die

    reference_rows = [r for r in rows if r["method"] == cfg.reference and r.get("ppl")]
    ref_ppl = reference_rows[0]["ppl"] if reference_rows else None
    for r in rows:
        if ref_ppl and r.get("ppl"):
            r["delta_ppl_pct"] = 100 * (r["ppl"] / ref_ppl - 1)
    reference = None
    if ref is not None and ref.prefill_runs + ref.decode_runs + ref.answer_runs:
        reference = {"method": SPEED_REFERENCE, "label": "transformers DynamicCache (uncompressed, speed reference)"}
        if ref.prefill_runs:
            reference.update(prefill_tok_s=len(prompt) / statistics.median(ref.prefill_runs), kv_bytes_prefill=ref.kv_bytes_prefill, **(ref.memory or {}))
        if ref.decode_runs:
            reference["decode_tok_s"] = cfg.decode_batch * cfg.decode_tokens / statistics.median(ref.decode_runs)
        if ref.answer_runs:
            reference["answer_s"] = statistics.median(ref.answer_runs)

    meta = {
        "command": command,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": getattr(model_spec, "name", "?"),
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "protocol": {"window": cfg.window, "max_windows": cfg.max_windows, "chunk_size": cfg.chunk_size,
                     "prefill_tokens": len(prompt), "decode_context": cfg.decode_context,
                     "decode_tokens": cfg.decode_tokens, "decode_batch": cfg.decode_batch,
                     "answer_context": cfg.answer_context, "answer_tokens": cfg.answer_tokens, "repeats": cfg.repeats, "measure": list(cfg.measure)},
        "versions": versions(),
        "git": revision,
    }
    results = {"meta": meta, "rows": rows, "speed_reference": reference, "config": OmegaConf.to_container(OmegaConf.structured(cfg))}
    write_json_atomic(run_dir / "bench.json", results)
    (run_dir / "bench.partial.json").unlink(missing_ok=True)
    write_csv(rows, reference, run_dir / "bench.csv")
    (run_dir / "bench.md").write_text(markdown(rows, reference, meta, cfg))
    pareto_plot(rows, ref_ppl, run_dir / "bench_pareto.png", meta)
    return results
