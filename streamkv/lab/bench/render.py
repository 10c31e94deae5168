"""The benchmark's outputs: the markdown table, the CSV and the perplexity-vs-bits plot."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from .plan import BenchConfig, method_spec

CSV_FIELDS = [
    "method", "bits", "status", "ppl", "delta_ppl_pct", "kl", "kl_p99", "top1_agreement", "avg_key_bits", "avg_value_bits", "avg_bits", "kv_bytes",
    "kv_bytes_fp16", "compression_ratio", "key_outlier_fraction", "value_outlier_fraction", "kv_bytes_prefill",
    "kv_bytes_prefill_fp16", "prefill_tok_s", "prefill_ratio", "decode_tok_s", "decode_ratio", "answer_s", "answer_ratio", "peak_rss_mib",
    "peak_rss_delta_mib", "cuda_peak_mib", "soak_growth_mib", "soak_rss_mib", "ppl_tokens", "ppl_seconds", "seconds", "label", "overrides", "error",
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
        f"{p['repeats']} runs; answer: a question on a {p.get('answer_context', 4096)}-token prompt end to end (prefill, then "
        f"{p.get('answer_tokens', 32)} greedy tokens), seconds. ×ref = median of per-run ratios to transformers' DynamicCache run just before "
        "(higher is faster). Peak RSS: the process's peak resident memory during the first long prefill "
        "(model weights included; Δ = above the resident memory at its start). Soak: resident memory after each of "
        f"{cfg.soak_sequences} sequences ({cfg.soak_tokens} prompt tokens, {cfg.soak_decode} decoded) through a fresh cache "
        "that is then dropped; growth from the third sequence to the last (MiB; flat = nothing a dropped cache held stays).",
        "",
        "| method | bits | K bits | V bits | KV MiB @window | ×smaller vs fp16 | ppl | Δppl | KL | KL p99 | top-1 | "
        "KV MiB @prefill | prefill tok/s | ×ref | decode tok/s | ×ref | answer s | ×ref | peak RSS MiB (Δ) | soak growth MiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
                _fmt(r.get("answer_s"), ".2f"),
                _fmt(r.get("answer_ratio"), ".2f"),
                peak_s,
                _fmt(r.get("soak_growth_mib"), "+.0f"),
                status,
            ]) + " |"
        )
    lines += ["", "Methods:", ""]
    for name in dict.fromkeys(r["method"] for r in rows):
        spec = method_spec(cfg, name)
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
