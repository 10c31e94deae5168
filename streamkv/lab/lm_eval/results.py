"""What an lm-eval run reports: each task's metrics under short names, and where retrieval breaks.

Scores of the long-context tasks are also split by prompt length and needle depth (from the
per-document scores lm-eval logs), and the RULER tasks run are averaged per length: the numbers a
needle heatmap and a RULER table are drawn from.
"""

from __future__ import annotations

from collections import defaultdict

from .catalog import PASSKEY, RULER


def metrics_of(res: dict) -> dict:
    """lm-eval's ``"acc,none"`` / ``"acc_stderr,none"`` keys as ``acc`` / ``acc_stderr`` (a filter other
    than ``none`` is kept as a suffix); non-numbers (``"N/A"`` stderrs, aliases) are left out."""
    out = {}
    for key, value in res.items():
        metric, _, filt = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and filt:
            out[metric if filt == "none" else f"{metric}[{filt}]"] = value
    return out


def breakdown(samples: list[dict], metric: str) -> dict[str, float]:
    """Mean ``metric`` per prompt length, per depth, and per (length, depth) of the logged ``samples``."""
    cells: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        doc, value = s["doc"], float(s[metric])
        length, depth = doc.get("length"), doc.get("depth")
        if length is not None:
            cells[f"{metric}_len_{length}"].append(value)
        if depth is not None:
            cells[f"{metric}_depth_{depth:g}"].append(value)
        if length is not None and depth is not None:
            cells[f"{metric}_len_{length}_depth_{depth:g}"].append(value)
    return {k: sum(v) / len(v) for k, v in sorted(cells.items())}


def per_task(out: dict) -> dict[str, dict]:
    """Each task's (and group's) metrics, with the long-context breakdowns and the RULER average."""
    tasks = {name: metrics_of(res) for name, res in {**out["results"], **out.get("groups", {})}.items()}
    samples = out.get("samples", {})
    for name, metric in [(PASSKEY, "acc"), *((r, "score") for r in RULER)]:
        if samples.get(name) and name in tasks:
            tasks[name].update(breakdown(samples[name], metric))
    ran = [r for r in RULER if r in tasks and "score" in tasks[r]]
    if ran:  # the RULER average over the tasks that ran, overall and per length
        avg = {"score": sum(tasks[r]["score"] for r in ran) / len(ran), "tasks": len(ran)}
        lengths = {k for r in ran for k in tasks[r] if k.startswith("score_len_") and "_depth_" not in k}
        for k in sorted(lengths):
            vals = [tasks[r][k] for r in ran if k in tasks[r]]
            avg[k] = sum(vals) / len(vals)
        tasks["ruler_average"] = avg
    return tasks
