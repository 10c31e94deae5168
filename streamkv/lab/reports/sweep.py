"""A sweep's report from its job directories: a table (markdown + CSV), a Pareto plot, an ablation chart
(and for long-context jobs the RULER table and needle heatmap of :mod:`.longctx`).

Everything is read back from disk (each job's results.json / failed.json, and Hydra's
.hydra/overrides.yaml for a short label), so a report can be made at any time, also while a sweep
runs or after some jobs were killed: those show as incomplete, failed jobs with their error line.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..runs.results import RESULTS
from . import longctx
from .figures import pyplot
from .jobs import FAILED_STATUS, INCOMPLETE, OK, Job, collect, load_job, pick_baseline

COLUMNS = ("job", "status", "quantizer", "sink", "outlier", "variant", "chunk", "key_bits", "value_bits",
           "avg_bits", "ppl", "delta_ppl", "delta_pct", "kl", "kl_p99", "top1_agreement", "compression_ratio",
           "tokens_per_s", "error")


def rows(jobs: list[Job], baseline: Optional[Job] = None) -> list[dict[str, Any]]:
    """One flat row per job (see COLUMNS); Δppl is against the baseline (blank without one)."""
    out = []
    for job in jobs:
        cfg, comp = job.config, job.components
        quant = cfg.get("quantizer") or {}
        row: dict[str, Any] = {
            "job": job.label,
            "status": job.status,
            "quantizer": comp.get("quantizer"),
            "sink": comp.get("sink"),
            "outlier": comp.get("outlier"),
            "variant": comp.get("ablation") or comp.get("experiment"),
            "chunk": job.results.get("chunk_size"),
            "key_bits": quant.get("key_bits") if quant.get("budget_bits") is None else None,  # a budget picks them
            "value_bits": quant.get("value_bits") if quant.get("budget_bits") is None else None,
            "avg_bits": job.avg_bits,
            "ppl": job.ppl,
            **{k: job.results.get("metrics", {}).get(k) for k in ("kl", "kl_p99", "top1_agreement")},
            "compression_ratio": job.results.get("compression", {}).get("compression_ratio"),
            "tokens_per_s": job.results.get("speed", {}).get("prefill_tokens_per_s"),
            "error": job.error,
        }
        base = pick_baseline(jobs, job, baseline)
        if job.ppl is not None and base is not None and base.ppl:
            row["delta_ppl"] = job.ppl - base.ppl
            row["delta_pct"] = 100 * (job.ppl - base.ppl) / base.ppl
        out.append(row)
    return out


def _fmt(value: Any, signed: bool = False) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:+.3g}" if signed else f"{value:.4g}"
    return str(value)


def markdown(name: str, table: list[dict], baseline_label: Optional[str]) -> str:
    ok = [r for r in table if r["status"] == OK]
    bad = [r for r in table if r["status"] != OK]
    head = ("job", "quantizer", "sink", "outlier", "K bits", "V bits", "avg bits", "ppl", "Δppl", "Δ%", "KL",
            "KL p99", "top-1", "ratio", "tok/s")
    keys = ("job", "quantizer", "sink", "outlier", "key_bits", "value_bits", "avg_bits", "ppl", "delta_ppl",
            "delta_pct", "kl", "kl_p99", "top1_agreement", "compression_ratio", "tokens_per_s")
    lines = [
        f"# Sweep report: {name}",
        "",
        f"{len(table)} jobs: {len(ok)} ok, {sum(r['status'] == FAILED_STATUS for r in table)} failed, "
        f"{sum(r['status'] == INCOMPLETE for r in table)} incomplete. "
        + (f"Δppl is against `{baseline_label}` (where model, data and task match)." if baseline_label
           else "No uncompressed baseline: Δppl is blank."),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in ok:
        cells = [_fmt(r.get(k), signed=k.startswith("delta")) for k in keys]
        cells[keys.index("tokens_per_s")] = _fmt(r["tokens_per_s"] and round(r["tokens_per_s"]))
        lines.append("| " + " | ".join(cells) + " |")
    if bad:
        lines += ["", "## Failed or incomplete jobs", ""]
        lines += [f"- `{r['job']}` ({r['status']}): {r['error']}" for r in bad]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, table: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in COLUMNS} for r in table)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both bits and ppl (lower is better for both), by bits."""
    front, best = [], math.inf
    for bits, ppl in sorted(points):
        if ppl < best:
            front.append((bits, ppl))
            best = ppl
    return front


def plot_pareto(path: Path, name: str, table: list[dict]) -> bool:
    """Perplexity against average bits with its Pareto front, and beside it the same for the mean KL
    divergence from the uncompressed model when the jobs measured it; points coloured by quantizer."""
    ok = [r for r in table if r["status"] == OK and r["avg_bits"] and r["ppl"]]
    if not ok:
        return False
    kl_rows = [r for r in ok if r.get("kl") is not None and r["kl"] > 0]
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if kl_rows else 1, figsize=(13 if kl_rows else 7, 4.8), squeeze=False)
    panels = [(axes[0][0], ok, "ppl", "perplexity")] + ([(axes[0][1], kl_rows, "kl", "mean KL vs uncompressed (nats)")] if kl_rows else [])
    colours = {q: f"C{i}" for i, q in enumerate(dict.fromkeys(str(r["quantizer"]) for r in ok))}
    for ax, rows_, key, ylabel in panels:
        for q, colour in colours.items():
            mine = [r for r in rows_ if str(r["quantizer"]) == q]
            if mine:
                ax.scatter([r["avg_bits"] for r in mine], [r[key] for r in mine], color=colour, zorder=3, label=q)
        for r in rows_:
            label = r["job"].replace("quantizer.", "").replace("experiment=", "")
            ax.annotate(label, (r["avg_bits"], r[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(r["avg_bits"], r[key]) for r in rows_])
        ax.step([f[0] for f in front], [f[1] for f in front], where="post", color="tab:red", label="Pareto front")
        ys = [r[key] for r in rows_]
        if key == "kl" or max(ys) / min(ys) > 3:
            ax.set_yscale("log")
        ax.set(xlabel="average bits per K/V element (everything stored)", ylabel=ylabel,
               title=f"{name}: {ylabel.split(' (')[0]} vs bits")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_ablation(path: Path, name: str, table: list[dict]) -> bool:
    """Δppl of each ablated variant against the full method (only for a sweep over ``ablation``)."""
    by_variant = {r["variant"]: r for r in table if r["status"] == OK and r["variant"]}
    full = by_variant.get("full")
    removed = {v: r["ppl"] - full["ppl"] for v, r in by_variant.items() if full and v not in ("full", "baseline")}
    if not removed:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = sorted(removed, key=removed.get)
    colors = ["tab:red" if removed[v] > 0 else "tab:green" for v in labels]  # red: removing it hurts
    bars = ax.barh(labels, [removed[v] for v in labels], color=colors)
    ax.bar_label(bars, fmt="%+.3g", fontsize=8, padding=2)
    ax.margins(x=0.25)  # room for the labels of negative bars
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(xlabel=f"Δppl vs the full method (ppl {full['ppl']:.4g})", title=f"{name}: removing one ingredient")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@dataclass
class Report:
    name: str
    jobs: list[Job]
    table: list[dict]
    files: dict[str, Path]


def make_report(sweep_dir: str | Path, out_dir: str | Path | None = None, baseline: str | Path | None = None) -> Report:
    """Collect the sweep's jobs and write report.md, report.csv, pareto.png (and ablation.png) to ``out_dir``."""
    sweep_dir = Path(sweep_dir)
    jobs = collect(sweep_dir)
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    base = _explicit_baseline(baseline)
    table = rows(jobs, base)
    name = next((j.config.get("name") for j in jobs if j.config.get("name")), sweep_dir.name)
    base_label = base.path.name if base else next((j.label for j in jobs if j.is_baseline), None)
    files = {"markdown": out / "report.md", "csv": out / "report.csv"}
    files["markdown"].write_text(markdown(name, table, base_label))
    write_csv(files["csv"], table)
    if plot_pareto(out / "pareto.png", name, table):
        files["pareto"] = out / "pareto.png"
    if plot_ablation(out / "ablation.png", name, table):
        files["ablation"] = out / "ablation.png"
    files.update(longctx.write(out, name, jobs, base or next((j for j in jobs if j.is_baseline), None)))
    return Report(name, jobs, table, files)


def _explicit_baseline(baseline: str | Path | None) -> Optional[Job]:
    if baseline is None:
        return None
    p = Path(baseline)
    job = load_job(p.parent if p.name == RESULTS else p)
    if job.status != OK:
        raise FileNotFoundError(f"baseline {baseline}: no results.json there")
    return job
