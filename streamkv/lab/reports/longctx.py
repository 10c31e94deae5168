"""Long-context results of a sweep side by side: a RULER table (task x length, the average, and the
retention against the uncompressed cache of the same sweep) and a needle-in-a-haystack heatmap (depth
x length, score as colour, one panel per configuration), the picture long-context papers use.

Both are read from the jobs' results.json (``lm_eval`` scores split by length and depth, see
:mod:`streamkv.lab.lm_eval.results`).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Optional

from .figures import pyplot
from .jobs import OK, Job

_LEN = re.compile(r"^score_len_(\d+)$")
_CELL = re.compile(r"^(score|acc)_len_(\d+)_depth_([0-9.e-]+)$")
NEEDLE = "streamkv_niah_"  # the needle tasks' prefix (passkey too, where no niah task ran)


def _scores(job: Job) -> dict:
    return job.results.get("lm_eval", {}) if job.status == OK else {}


def lengths_of(jobs: list[Job]) -> list[int]:
    return sorted({int(m.group(1)) for j in jobs for ms in _scores(j).values() for k in ms if (m := _LEN.match(k))})


def tasks_of(jobs: list[Job]) -> list[str]:
    return list(dict.fromkeys(t for j in jobs for t, ms in _scores(j).items() if any(_LEN.match(k) for k in ms) and t != "ruler_average"))


def table(jobs: list[Job], baseline: Optional[Job]) -> tuple[list[str], list[list]]:
    """Header and rows: per configuration, each task's score per length, the average per length and
    overall, and the average's retention (% of the baseline's) per length."""
    lengths, tasks = lengths_of(jobs), tasks_of(jobs)
    head = ["job", "avg bits", "compress_question"] + [f"{t.removeprefix('streamkv_')} @{n}" for t in tasks for n in lengths]
    head += [f"average @{n}" for n in lengths] + ["average"] + [f"retention @{n}" for n in lengths]
    base = _scores(baseline).get("ruler_average", {}) if baseline else {}
    rows = []
    for job in [j for j in jobs if _scores(j)]:
        s = _scores(job)
        avg = s.get("ruler_average", {})
        row = [job.label, job.results.get("compression", {}).get("avg_bits"), job.results.get("protocol", {}).get("compress_question")]
        row += [s.get(t, {}).get(f"score_len_{n}") for t in tasks for n in lengths]
        row += [avg.get(f"score_len_{n}") for n in lengths] + [avg.get("score")]
        row += [_retention(avg.get(f"score_len_{n}"), base.get(f"score_len_{n}")) for n in lengths]
        rows.append(row)
    return head, rows


def _retention(score: Optional[float], reference: Optional[float]) -> Optional[float]:
    return None if score is None or not reference else 100 * score / reference


def cells(job: Job) -> dict[tuple[int, float], float]:
    """(length, depth) -> mean needle score of ``job`` over the needle tasks that ran (else passkey)."""
    s = _scores(job)
    needle = [t for t in s if t.startswith(NEEDLE)] or [t for t in s if t == "streamkv_passkey"]
    sums: dict[tuple[int, float], list[float]] = {}
    for t in needle:
        for k, v in s[t].items():
            m = _CELL.match(k)
            if m:
                sums.setdefault((int(m.group(2)), float(m.group(3))), []).append(v)
    return {c: sum(v) / len(v) for c, v in sums.items()}


def heatmap(path: Path, name: str, jobs: list[Job]) -> bool:
    """One panel per configuration: needle depth (rows, 0 = start) x prompt length (columns), the mean
    score of the needle tasks as colour (red 0 .. green 1), each cell annotated."""
    panels = [(j.label, c) for j in jobs if (c := cells(j))]
    if not panels:
        return False
    import numpy as np

    lengths = sorted({n for _, c in panels for n, _ in c})
    depths = sorted({d for _, c in panels for _, d in c})
    plt = pyplot()
    cols = min(len(panels), 4)
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.2 + 1.1 * len(lengths) * cols, 0.9 + 0.45 * len(depths) * rows_n),
                             squeeze=False, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (label, c) in zip(axes.flat, panels):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for (n, d), v in c.items():
            grid[depths.index(d), lengths.index(n)] = v
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i in range(len(depths)):
            for k in range(len(lengths)):
                if not np.isnan(grid[i, k]):
                    ax.text(k, i, f"{grid[i, k]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(label.replace("experiment=", "") or "job", fontsize=8)
        ax.set_xlabel("tokens", fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("needle depth", fontsize=7)
    fig.suptitle(f"{name}: needle retrieval by depth and length (score)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write(out: Path, name: str, jobs: list[Job], baseline: Optional[Job]) -> dict[str, Path]:
    """ruler.md, ruler.csv and needle_heatmap.png in ``out`` (whichever the jobs have data for)."""
    files: dict[str, Path] = {}
    head, rows = table(jobs, baseline)
    if rows:
        md = [f"# Long-context report: {name}", "",
              f"RULER scores (string_match_all, 0-1) per task and prompt length; retention: the average as % of "
              f"`{baseline.label if baseline else 'no baseline'}` (the uncompressed cache of the same sweep).", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
        files["ruler"] = out / "ruler.md"
        files["ruler"].write_text("\n".join(md) + "\n")
        files["ruler_csv"] = out / "ruler.csv"
        with open(files["ruler_csv"], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(head)
            w.writerows(rows)
    if heatmap(out / "needle_heatmap.png", name, jobs):
        files["heatmap"] = out / "needle_heatmap.png"
    return files
