"""Kernel benchmark: one decode step's attention over a compressed history, against SDPA on the same
history in bf16 (``python -m runners.bench_attention``).

The history is stored the framework's default 4-bit way, after RoPE: Hadamard-rotated per-channel keys
in groups of 128 tokens, rotated per-token values in groups of 64 channels, 4 sinks at 8 bits, 1% of the
keys as sparse outliers (top-k), Llama-3.1-8B's attention layout (32 query heads, 8 KV heads, head dim
128). Rows, per context x batch:

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the bf16 history (the baseline);
* ``triton``: :class:`~streamkv.kv.attention.triton.TritonBackend` on the compressed segments;
* ``fused``: :class:`~streamkv.kv.attention.fused.FusedBackend` (torch ops per segment);
* ``dense``: the reference read (dequantize the history into bf16, then SDPA), the old path.

Times are medians of CUDA-event timed repeats after a warm-up (wall clock on the CPU). ``GB/s`` is the
bytes each row must read (bf16 K/V for ``sdpa``; the stored history: codes, scales, sinks, outliers,
for the compressed rows) over its time, set against a device-to-device copy measured in the same run.
``--smoke`` runs tiny shapes on the CPU (the ``triton`` row under ``TRITON_INTERPRET=1`` only).
No Hydra: the components are built directly.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...kv.attention import FusedBackend, TritonBackend
from ...kv.compression import Compression
from ...kv.errors import ConfigError
from ...kv.layer import CompressedLayer
from ...kv.outliers.topk import TopKOutliers
from ...kv.quantizers.uniform import UniformQuantizer
from ...kv.sinks.fixed import FixedSinks

BACKENDS = ("sdpa", "triton", "fused", "dense")


@dataclass
class Setup:
    contexts: list[int]
    batches: list[int]
    q_heads: int = 32
    kv_heads: int = 8
    dim: int = 128
    key_group: int = 128
    value_group: int = 64
    backends: tuple[str, ...] = BACKENDS
    warmup: int = 5
    repeats: int = 20
    chunk: int = 8192  # tokens compressed per layer update while building the history
    copy_mib: int = 1024


def default_compression(setup: Setup, attention) -> Compression:
    q = UniformQuantizer(key_bits=4, value_bits=4, key_group_size=setup.key_group, value_group_size=setup.value_group,
                         pre_rope=False, rotate_keys=True, rotate_values=True)
    return Compression(q, FixedSinks(size=4, key_bits=8, value_bits=8), TopKOutliers(fraction=0.01, keys=True, values=False), attention)


def timer(device: torch.device, warmup: int, repeats: int):
    """``measure(fn)`` → median milliseconds of ``fn()`` (CUDA events on a GPU)."""

    def measure(fn) -> float:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            times = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
        else:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    return measure


def copy_bandwidth(device: torch.device, mib: int, measure) -> float:
    """Bytes/s of a device-to-device copy (read + write) of ``mib`` MiB."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


def _history(setup: Setup, batch: int, context: int, device, dtype):
    """bf16 keys/values (batch, kv_heads, context + 1, dim), the last token the step's own; and the
    compressed layer holding the first ``context``."""
    g = torch.Generator(device=device).manual_seed(context + batch)
    shape = (batch, setup.kv_heads, context + 1, setup.dim)
    channel = torch.ones(setup.dim, device=device)
    channel[:: max(1, setup.dim // 8)] = 4.0  # a few large key channels, as after RoPE in real models
    k = (torch.randn(shape, generator=g, device=device, dtype=dtype) * channel.to(dtype))
    v = torch.randn(shape, generator=g, device=device, dtype=dtype)
    layer = CompressedLayer(default_compression(setup, FusedBackend()), backend=FusedBackend())
    for s in range(0, context, setup.chunk):
        e = min(context, s + setup.chunk)
        layer.update(k[:, :, s:e], v[:, :, s:e])
    return k, v, layer


def bench_one(setup: Setup, batch: int, context: int, device, dtype, measure, copy_bps: float) -> list[dict]:
    k, v, layer = _history(setup, batch, context, device, dtype)
    rows = batch * setup.kv_heads
    own_k = k[:, :, context:].reshape(rows, 1, setup.dim)
    own_v = v[:, :, context:].reshape(rows, 1, setup.dim)
    g = torch.Generator(device=device).manual_seed(7)
    q = torch.randn(batch, setup.q_heads, 1, setup.dim, generator=g, device=device, dtype=dtype)
    scale = setup.dim**-0.5
    stored = sum(t.nbytes for s in (layer.k, layer.v) for ts in s.parts().values() for t in ts) + own_k.nbytes + own_v.nbytes
    bf16 = k.nbytes + v.nbytes
    out = []
    sdpa_ms = None
    for name in setup.backends:
        row = {"context": context, "batch": batch, "backend": name}
        view = layer.view(own_k, own_v)
        if name == "sdpa":
            fn, nbytes = (lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)), bf16
        elif name == "dense":
            def fn():
                kd, vd = view.dense()
                return F.scaled_dot_product_attention(q, kd, vd, scale=scale, enable_gqa=True)
            nbytes = stored
        else:
            backend = TritonBackend() if name == "triton" else FusedBackend()
            try:
                backend.check(layer.c, device)
            except ConfigError as e:
                out.append({**row, "skipped": str(e)})
                continue
            view.backend = backend
            fn, nbytes = (lambda b=backend, vw=view: b.attend(vw, q, None, scale)), stored
        try:
            ms = measure(fn)
        except torch.OutOfMemoryError as e:  # pragma: no cover - the largest shapes on a small GPU
            out.append({**row, "skipped": f"out of memory: {str(e).splitlines()[0]}"})
            continue
        if name == "sdpa":
            sdpa_ms = ms
        gbs = nbytes / (ms * 1e-3) / 1e9
        out.append({**row, "ms": ms, "bytes": nbytes, "GB/s": gbs, "copy_frac": gbs * 1e9 / copy_bps,
                    "vs_sdpa": (sdpa_ms / ms) if sdpa_ms else None})
    del k, v, layer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def check_against_sdpa(setup: Setup, device, dtype) -> float:
    """Max |triton - sdpa on the dequantized history| of one small step (a sanity line for the table)."""
    k, v, layer = _history(setup, 1, 4 * setup.key_group, device, dtype)
    own_k = k[:, :, -1:].reshape(setup.kv_heads, 1, setup.dim)
    own_v = v[:, :, -1:].reshape(setup.kv_heads, 1, setup.dim)
    q = torch.randn(1, setup.q_heads, 1, setup.dim, device=device, dtype=dtype)
    view = layer.view(own_k, own_v)
    kd, vd = view.dense()
    ref = F.scaled_dot_product_attention(q, kd, vd, enable_gqa=True).transpose(1, 2)
    got = TritonBackend().attend(view, q, None, setup.dim**-0.5)
    return (got.float() - ref.float()).abs().max().item()


def table(rows: list[dict]) -> str:
    lines = ["| context | batch | backend | ms | GB/s | % of copy | x SDPA |", "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['context']} | {r['batch']} | {r['backend']} | skipped: {r['skipped']} | | | |")
            continue
        vs = "" if r["vs_sdpa"] is None else f"{r['vs_sdpa']:.2f}x"
        lines.append(f"| {r['context']} | {r['batch']} | {r['backend']} | {r['ms']:.4f} | {r['GB/s']:.3g} | "
                     f"{100 * r['copy_frac']:.0f}% | {vs} |")
    return "\n".join(lines)


def run(setup: Setup, device: torch.device, out_dir: Path | None = None) -> dict:
    dtype = torch.bfloat16
    measure = timer(device, setup.warmup, setup.repeats)
    copy_bps = copy_bandwidth(device, setup.copy_mib, measure)
    versions = {"torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        versions["triton"] = "absent"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (f"# Decode attention over a compressed history ({name}; {versions})\n\n"
              f"Layout: {setup.q_heads} q heads, {setup.kv_heads} KV heads, head dim {setup.dim}, bf16. Storage: 4-bit "
              f"rotated per-channel keys g{setup.key_group} (post-RoPE), rotated per-token values g{setup.value_group}, "
              f"4 sinks at 8 bits, 1% key outliers. Median of {setup.repeats} after {setup.warmup} warm-up. "
              f"Copy bandwidth (device-to-device, read + write): {copy_bps / 1e9:.0f} GB/s.\n")
    print(header, flush=True)
    rows: list[dict] = []
    if "triton" in setup.backends and TritonBackend.importable():
        err = check_against_sdpa(setup, device, dtype)
        print(f"triton vs SDPA on the dequantized history, one step: max |diff| = {err:.2e}\n", flush=True)
    for context in setup.contexts:
        for batch in setup.batches:
            rows += bench_one(setup, batch, context, device, dtype, measure, copy_bps)
            print(table([r for r in rows if r["context"] == context and r["batch"] == batch]).split("\n", 2)[-1], flush=True)
    text = header + "\n" + table(rows) + "\n"
    print("\n" + table(rows), flush=True)
    result = {"setup": asdict(setup), "device": name, "versions": versions, "copy_GBps": copy_bps / 1e9, "rows": rows}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench_attention.md").write_text(text)
        (out_dir / "bench_attention.json").write_text(json.dumps(result, indent=1))
        print(f"written: {out_dir}/bench_attention.md, bench_attention.json", flush=True)
    return result
