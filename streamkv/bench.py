"""Side-by-side benchmark of KV-cache methods: quality, memory and speed in one run.

Each *method* is a list of overrides of the ``eval`` config (usually one ``experiment=<preset>``, plus
``{bits}`` placeholders for its bit widths), so peers are registered strategies composed exactly like
ours. For every method at every bit width the benchmark measures, on one loaded model and text:

* **quality** - streaming perplexity (the :class:`~streamkv.tasks.perplexity.Perplexity` task:
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
error (``crashed``), one whose backend package is missing as ``skipped``; neither stops the others.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import logging
import math
import os
import re
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from . import registry
from .context import new_cache
from .kv.compression import Compression
from .context import RunContext
from .kv.errors import ConfigError, check
from .kv.model_facts import max_positions
from .results import git_revision, versions, write_json_atomic
from .streaming import prefill
from .tasks.perplexity import Perplexity

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
SPEED_REFERENCE = "DynamicCache"


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
    repeats: int = 3  # timed runs per measurement (median)
    measure: list[str] = field(default_factory=lambda: ["ppl", "prefill", "decode"])
    reference: str = "baseline"  # the method Δppl is computed against, run first when ppl is measured
    # (speed is always paired with transformers' DynamicCache)
    run: list[str] = field(default_factory=list)  # methods to run, in order; empty = all
    bits: Optional[list[int]] = None  # keep only these widths of methods that have a {bits} placeholder
    speed_bits: Optional[list[int]] = None  # measure speed/memory only at these widths (null = all)
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    threads: Optional[int] = None  # torch.set_num_threads; null = torch's default
    kl_cache_mb: int = 1024  # reference log-probs kept across methods (KL needs them; 2 windows of SmolLM2 fit)
    seed: int = 0
    progress: bool = True


ConfigStore.instance().store(group="schema", name="bench", node=BenchConfig, provider="streamkv")

MEASURES = ("ppl", "prefill", "decode")


# -- composition ------------------------------------------------------------------------------------
def compose_eval(overrides: list[str], conf_dir: str | os.PathLike = CONF_DIR) -> DictConfig:
    """The ``eval`` config composed with ``overrides`` (inside a Hydra app, through its search path)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import streamkv.schema  # noqa: F401  (the eval schema)

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
        spec = cfg.methods[name]
        templated = any("{bits}" in o for o in spec.overrides)
        widths = list(spec.bits) or [0]
        if templated and cfg.bits is not None and name != cfg.reference:
            widths = [b for b in widths if b in cfg.bits]
        for b in widths:
            speed = not templated or cfg.speed_bits is None or b in cfg.speed_bits
            jobs.append(Job(name, spec.label or name, b, [o.replace("{bits}", str(b)) for o in spec.overrides], speed))
    return jobs


# -- measurements -----------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak resident memory of this process inside a ``with`` block (Linux VmHWM, reset on entry),
    and ``torch.cuda.max_memory_allocated`` on GPU. Freed heap is returned to the OS first."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_rss = self.start_rss = self.cuda_peak = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._hwm = True
        except OSError:
            self._hwm = False
        self.start_rss = _status_kb("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)
        self.peak_rss = _status_kb("VmHWM") if self._hwm else None

    def as_dict(self) -> dict[str, float | None]:
        mib = lambda kb: None if kb is None else kb / 1024  # noqa: E731
        return {
            "peak_rss_mib": mib(self.peak_rss),
            "peak_rss_delta_mib": mib(None if self.peak_rss is None else self.peak_rss - self.start_rss),
            "cuda_peak_mib": None if self.cuda_peak is None else self.cuda_peak / 2**20,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_prefill(model, ids: torch.Tensor, cache, chunk_size: int) -> float:
    """Seconds to feed ``ids`` through ``cache`` in chunks (the streaming prefill, last logits only)."""
    device = next(model.parameters()).device
    _sync(device)
    t0 = time.perf_counter()
    prefill(model, ids, cache, chunk_size)
    _sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def timed_decode(model, cache, token: int, n: int, batch: int = 1) -> float:
    """Seconds for ``n`` greedy decode steps (one token per sequence per forward) on top of ``cache``."""
    device = next(model.parameters()).device
    ids = torch.full((batch, 1), token, device=device)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        ids = logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - t0


class SpeedReference:
    """transformers' ``DynamicCache``, measured just before each timed run of a method (paired)."""

    def __init__(self, model, ids: torch.Tensor, cfg: BenchConfig):
        from transformers import DynamicCache

        self.model, self.ids, self.cfg = model, ids, cfg
        self.new = lambda: DynamicCache(config=model.config)
        self.prefill_runs: list[float] = []
        self.decode_runs: list[float] = []
        self.memory: dict | None = None
        self.kv_bytes_prefill: int | None = None
        self._decode_cache = None

    def prefill_seconds(self) -> float:
        cache = self.new()
        if self.memory is None:
            with PeakMemory(next(self.model.parameters()).device) as pm:
                s = timed_prefill(self.model, self.ids, cache, self.cfg.chunk_size)
            self.memory = pm.as_dict()
            self.kv_bytes_prefill = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        else:
            s = timed_prefill(self.model, self.ids, cache, self.cfg.chunk_size)
        self.prefill_runs.append(s)
        return s

    def decode_seconds(self) -> float:
        ctx = self.cfg.decode_context
        if self._decode_cache is None:
            self._decode_cache = self.new()
            prefill(self.model, self.ids[:ctx], self._decode_cache, self.cfg.chunk_size, self.cfg.decode_batch)
        s = timed_decode(self.model, self._decode_cache, int(self.ids[ctx]), self.cfg.decode_tokens, self.cfg.decode_batch)
        self._decode_cache.crop(ctx - self._decode_cache.get_seq_length())  # back to the same context
        self.decode_runs.append(s)
        return s


def measure_speed(model, ids: torch.Tensor, make_cache: Callable, cfg: BenchConfig, ref: SpeedReference) -> dict:
    """Prefill and decode throughput of ``make_cache()`` caches, each run paired with ``ref``."""
    out: dict[str, Any] = {}
    device = next(model.parameters()).device
    n_prompt, ctx = len(ids), cfg.decode_context
    if "prefill" in cfg.measure:
        runs, ratios = [], []
        for r in range(cfg.repeats):
            rs = ref.prefill_seconds()
            cache = make_cache()
            if r == 0:
                with PeakMemory(device) as pm:
                    s = timed_prefill(model, ids, cache, cfg.chunk_size)
                out.update(pm.as_dict())
                stats = cache.stats()
                out["kv_bytes_prefill"] = stats["kv_bytes"]
                out["kv_bytes_prefill_fp16"] = stats["kv_bytes_fp16"]
            else:
                s = timed_prefill(model, ids, cache, cfg.chunk_size)
            del cache
            runs.append(s)
            ratios.append(rs / s)
        out["prefill_tok_s"] = n_prompt / statistics.median(runs)
        out["prefill_ratio"] = statistics.median(ratios)
        out["prefill_runs_s"] = runs
        out["prefill_ref_runs_s"] = ref.prefill_runs[-len(runs):]
    if "decode" in cfg.measure:
        cache = make_cache()
        prefill(model, ids[:ctx], cache, cfg.chunk_size, cfg.decode_batch)
        timed_decode(model, cache, int(ids[ctx]), 2, cfg.decode_batch)  # warm-up: first decode-shaped forwards
        runs, ratios = [], []
        for _ in range(cfg.repeats):
            rs = ref.decode_seconds()
            s = timed_decode(model, cache, int(ids[ctx]), cfg.decode_tokens, cfg.decode_batch)
            runs.append(s)
            ratios.append(rs / s)
        del cache
        out["decode_tok_s"] = cfg.decode_batch * cfg.decode_tokens / statistics.median(runs)
        out["decode_ratio"] = statistics.median(ratios)
        out["decode_runs_s"] = runs
        out["decode_ref_runs_s"] = ref.decode_runs[-len(runs):]
    return out


def warm_up(model, ids: torch.Tensor, make_cache: Callable, chunk_size: int) -> None:
    """Two chunks and two decode steps, so one-time costs (kernels, JIT extensions) are not timed."""
    cache = make_cache()
    n = min(len(ids) - 1, 2 * chunk_size)
    prefill(model, ids[:n], cache, chunk_size)
    timed_decode(model, cache, int(ids[n]), 2)


# -- the run ----------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _resolve_data_path(data) -> None:
    """A relative ``data.path`` that is not there from here is taken relative to the repository."""
    path = getattr(data, "path", None)
    if path and not Path(path).expanduser().is_absolute() and not Path(path).is_file() and (REPO / path).is_file():
        data.path = str(REPO / path)


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
    _resolve_data_path(data)
    text = data.load()
    model, tokenizer = model_spec.load()
    device = next(model.parameters()).device
    limit = max_positions(model)
    n_prompt = cfg.prefill_tokens or limit
    check(n_prompt is not None, "prefill_tokens must be set: the model does not say its maximum positions")
    check(limit is None or n_prompt <= limit, f"prefill_tokens={n_prompt} exceeds the model's {limit} positions")
    speed_wanted = any(m in cfg.measure for m in ("prefill", "decode")) and any(j.speed for j in jobs)
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
    if ref is not None and ref.prefill_runs + ref.decode_runs:
        reference = {"method": SPEED_REFERENCE, "label": "transformers DynamicCache (uncompressed, speed reference)"}
        if ref.prefill_runs:
            reference.update(prefill_tok_s=len(prompt) / statistics.median(ref.prefill_runs), kv_bytes_prefill=ref.kv_bytes_prefill, **(ref.memory or {}))
        if ref.decode_runs:
            reference["decode_tok_s"] = cfg.decode_batch * cfg.decode_tokens / statistics.median(ref.decode_runs)

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
                     "decode_tokens": cfg.decode_tokens, "decode_batch": cfg.decode_batch, "repeats": cfg.repeats, "measure": list(cfg.measure)},
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


# -- reports ----------------------------------------------------------------------------------------
CSV_FIELDS = [
    "method", "bits", "status", "ppl", "delta_ppl_pct", "kl", "kl_p99", "top1_agreement", "avg_key_bits", "avg_value_bits", "avg_bits", "kv_bytes",
    "kv_bytes_fp16", "compression_ratio", "key_outlier_fraction", "value_outlier_fraction", "kv_bytes_prefill",
    "kv_bytes_prefill_fp16", "prefill_tok_s", "prefill_ratio", "decode_tok_s", "decode_ratio", "peak_rss_mib",
    "peak_rss_delta_mib", "cuda_peak_mib", "ppl_tokens", "ppl_seconds", "seconds", "label", "overrides", "error",
]


def write_csv(rows: list[dict], reference: dict | None, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows + ([reference] if reference else []):
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})


def _fmt(v, spec: str, empty: str = "—") -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return empty
    return format(v, spec)


def markdown(rows: list[dict], reference: dict | None, meta: dict, cfg: BenchConfig) -> str:
    p = meta["protocol"]
    mib = lambda b: None if b in (None, "") else b / 2**20  # noqa: E731
    lines = [
        f"# KV-cache benchmark: {meta['model']} ({meta['dtype']}, {meta['device']})",
        "",
        f"- command: `{meta['command'] or 'run_bench(...)'}`",
        f"- date: {meta['started']} to {meta['finished']}; git {meta['git']}; "
        f"torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}",
        f"- machine: {meta['cpus']} CPUs, {meta['threads']} torch threads, load average "
        f"{_fmt_load(meta['load_average_start'])} at start, {_fmt_load(meta['load_average_end'])} at end",
        f"- perplexity: streaming protocol, windows of {p['window']} tokens fed in chunks of {p['chunk_size']}, "
        f"{p['max_windows']} windows; Δppl against `{cfg.reference}`. Bits and KV MiB: the cache after one window, "
        "counted from the tensors it holds (codes, scales, zeros, sinks, outliers with indices, full-precision residual). "
        "KL: mean KL(P_uncompressed || P_method) of the next-token distributions per scored token (nats), against an "
        "uncompressed pass over the same windows and chunks in the same run; p99 its 99th percentile; top-1: the "
        "fraction of tokens whose argmax agrees.",
        f"- speed: prefill of a {p['prefill_tokens']}-token prompt in chunks of {p['chunk_size']} (last logits only); "
        f"decode of {p['decode_tokens']} greedy tokens x batch {p.get('decode_batch', 1)} at a {p['decode_context']}-token context; medians of "
        f"{p['repeats']} runs. ×ref = median of per-run ratios to transformers' DynamicCache run just before "
        "(higher is faster). Peak RSS: the process's peak resident memory during the first long prefill "
        "(model weights included; Δ = above the resident memory at its start).",
        "",
        "| method | bits | K bits | V bits | KV MiB @window | ×smaller vs fp16 | ppl | Δppl | KL | KL p99 | top-1 | "
        "KV MiB @prefill | prefill tok/s | ×ref | decode tok/s | ×ref | peak RSS MiB (Δ) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows + ([reference] if reference else []):
        status = r.get("status", "reference")
        if r.get("error"):
            status = f"{status}: {r['error']}".replace("|", "/")
        delta = r.get("delta_ppl_pct")
        peak = r.get("peak_rss_mib")
        peak_s = "—" if peak is None else f"{peak:.0f} ({_fmt(r.get('peak_rss_delta_mib'), '+.0f')})"
        if r.get("cuda_peak_mib") is not None:
            peak_s += f", cuda {r['cuda_peak_mib']:.0f}"
        lines.append(
            "| " + " | ".join([
                f"`{r['method']}`",
                str(r.get("bits", "—") or "—"),
                _fmt(r.get("avg_key_bits"), ".2f"),
                _fmt(r.get("avg_value_bits"), ".2f"),
                _fmt(mib(r.get("kv_bytes")), ".2f"),
                _fmt(r.get("compression_ratio"), ".2f"),
                _fmt(r.get("ppl"), ".3f"),
                "—" if delta is None else f"{delta:+.2f}%",
                _fmt(r.get("kl"), ".4f"),
                _fmt(r.get("kl_p99"), ".3f"),
                _fmt(r.get("top1_agreement"), ".4f"),
                _fmt(mib(r.get("kv_bytes_prefill")), ".2f"),
                _fmt(r.get("prefill_tok_s"), ".0f"),
                _fmt(r.get("prefill_ratio"), ".2f"),
                _fmt(r.get("decode_tok_s"), ".2f"),
                _fmt(r.get("decode_ratio"), ".2f"),
                peak_s,
                status,
            ]) + " |"
        )
    lines += ["", "Methods:", ""]
    for name in dict.fromkeys(r["method"] for r in rows):
        spec = cfg.methods[name]
        lines.append(f"- `{name}`: {spec.label} — `{' '.join(spec.overrides)}`")
    return "\n".join(lines) + "\n"


def _fmt_load(load) -> str:
    return "?" if not load else "/".join(f"{x:.1f}" for x in load)


def pareto_plot(rows: list[dict], ref_ppl: float | None, path: Path, meta: dict) -> None:
    """Perplexity against average stored bits, one marker (and line over its widths) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "os^DvP*XhH<>"
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("ppl") and r.get("avg_bits") and r.get("delta_ppl_pct") != 0:  # the reference is the dashed line
            by_method.setdefault(r["method"], []).append(r)
    for i, (name, rs) in enumerate(by_method.items()):
        rs = sorted(rs, key=lambda r: r["avg_bits"])
        ax.plot([r["avg_bits"] for r in rs], [r["ppl"] for r in rs], marker=markers[i % len(markers)], label=name)
        for r in rs:
            ax.annotate(str(r["bits"]), (r["avg_bits"], r["ppl"]), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if ref_ppl:
        ax.axhline(ref_ppl, color="grey", linestyle="--", linewidth=1, label=f"uncompressed ({ref_ppl:.2f})")
    ax.set_xlabel("average stored bits per key/value element")
    ax.set_ylabel("perplexity (streaming)")
    if by_method and max(r["ppl"] for rs in by_method.values() for r in rs) > 3 * min(r["ppl"] for rs in by_method.values() for r in rs):
        ax.set_yscale("log")
    ax.set_title(f"{meta['model']}: perplexity vs KV-cache bits", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
