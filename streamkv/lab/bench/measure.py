"""How the benchmark times and weighs a cache: prefill and decode throughput, and a long-context
question end to end (prefill, then the answer decoded), paired run by run with transformers'
``DynamicCache`` (so load on a shared machine hits both sides of a ratio alike), the
process's peak memory during the long prefill, and a soak: many sequences, each through a fresh
cache that is then dropped, whose resident memory must not grow with their number."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from ..runs.memory import PeakMemory, resident_mib
from ..streaming import prefill
from .plan import BenchConfig


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


def timed_answer(model, ids: torch.Tensor, cache, chunk_size: int, n: int) -> float:
    """Seconds to prefill ``ids`` into an empty ``cache`` and decode an ``n``-token greedy answer: what a
    long-context question (a needle sample) costs end to end; the content does not change the cost."""
    return timed_prefill(model, ids, cache, chunk_size) + timed_decode(model, cache, int(ids[-1]), n)


class SpeedReference:
    """transformers' ``DynamicCache``, measured just before each timed run of a method (paired)."""

    def __init__(self, model, ids: torch.Tensor, cfg: BenchConfig):
        from transformers import DynamicCache

        self.model, self.ids, self.cfg = model, ids, cfg
        self.new = lambda: DynamicCache(config=model.config)
        self.prefill_runs: list[float] = []
        self.decode_runs: list[float] = []
        self.answer_runs: list[float] = []
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


    def answer_seconds(self) -> float:
        s = timed_answer(self.model, self.ids[: self.cfg.answer_context], self.new(), self.cfg.chunk_size,
                         self.cfg.answer_tokens)
        self.answer_runs.append(s)
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
    if "answer" in cfg.measure:
        # warm-up: a full-length prompt reaches storage layouts (widths per head, per interval) that the
        # short warm-up does not, and each compiles its kernel the first time it is read
        timed_answer(model, ids[: cfg.answer_context], make_cache(), cfg.chunk_size, 2)
        runs, ratios = [], []
        for _ in range(cfg.repeats):
            rs = ref.answer_seconds()
            s = timed_answer(model, ids[: cfg.answer_context], make_cache(), cfg.chunk_size, cfg.answer_tokens)
            runs.append(s)
            ratios.append(rs / s)
        out["answer_s"] = statistics.median(runs)
        out["answer_ratio"] = statistics.median(ratios)
        out["answer_runs_s"] = runs
        out["answer_ref_runs_s"] = ref.answer_runs[-len(runs):]
    return out


def warm_up(model, ids: torch.Tensor, make_cache: Callable, chunk_size: int) -> None:
    """Two chunks and two decode steps, so one-time costs (kernels, JIT extensions) are not timed."""
    cache = make_cache()
    n = min(len(ids) - 1, 2 * chunk_size)
    prefill(model, ids[:n], cache, chunk_size)
    timed_decode(model, cache, int(ids[n]), 2)


def measure_soak(model, ids: torch.Tensor, make_cache: Callable, cfg: BenchConfig) -> dict:
    """``cfg.soak_sequences`` sequences of ``soak_tokens`` prompt tokens (chunked) and ``soak_decode``
    decoded tokens, each through a fresh cache dropped afterwards; the resident memory after each
    (MiB) and its growth from the third on (the first ones warm allocator pools and compiled code)."""
    import gc

    rss = []
    for i in range(cfg.soak_sequences):
        start = (i * cfg.soak_tokens) % max(1, len(ids) - cfg.soak_tokens - 1)
        cache = make_cache()
        prefill(model, ids[start : start + cfg.soak_tokens], cache, cfg.chunk_size)
        timed_decode(model, cache, int(ids[start + cfg.soak_tokens]), cfg.soak_decode)
        del cache
        gc.collect()
        rss.append(resident_mib())
    return {"soak_rss_mib": rss, "soak_growth_mib": rss[-1] - rss[min(2, len(rss) - 1)]}
