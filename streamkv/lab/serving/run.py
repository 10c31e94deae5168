"""The whole serving benchmark: every configuration's quality, then each serving run, side by side.

A serving run is repeated ``repeats`` times, the configurations in order and then reversed (ABC CBA), and
each keeps its fastest run: load from elsewhere on a shared machine only ever slows a run, and drift
over the minutes a run takes then reaches every configuration alike."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Callable

from ..runs.results import write_text_atomic
from .measure import child
from .report import render


def serve_all(opts: dict, name: str, mib: int, into: dict, save: Callable[[], object]) -> None:
    """Each serving configuration ``opts["repeats"]`` times in ABC CBA order, into ``into[config]``: its
    fastest run so far, with every run's seconds (``seconds_each``), or the first error where a run
    failed; ``save()`` after every run."""
    configs = opts["serve_configs"].split(",")
    tries: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(opts["repeats"]):
        for c in configs if r % 2 == 0 else configs[::-1]:
            tries[c].append(child("serve", {**opts, "config": c, "kv_mib": mib}, opts["timeout"]))
            print(name, c, json.dumps(tries[c][-1]), flush=True)
            into[c] = best(tries[c])
            save()


def best(tries: list[dict]) -> dict:
    """The fastest of one configuration's runs, with every run's seconds; the first error if one failed."""
    failed = [t for t in tries if "error" in t]
    if failed:
        return failed[0]
    return {**min(tries, key=lambda t: t["seconds"]), "seconds_each": [t["seconds"] for t in tries]}


def run(opts: dict, out: Path, command: str) -> str:
    """Measure everything ``opts`` asks for into ``out`` (``results.json``, ``results.md``, rewritten after
    every measurement, so an interrupted run keeps what it finished); the table."""
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, opts["skip"].split(",")))
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
           "host": platform.node(), "load_before": os.getloadavg(), "args": opts, "quality": {}, "serve": {}}

    def save() -> str:
        res["load_after"] = os.getloadavg()
        text = render(res)
        write_text_atomic(out / "results.json", json.dumps(res, indent=1))
        write_text_atomic(out / "results.md", text)
        return text

    ref = out / "stock_logprobs.f32"  # stock's full log-softmax rows, for KL; removed at the end
    ref.unlink(missing_ok=True)
    try:
        configs = opts["configs"].split(",")
        for c in [] if "quality" in skip else ["bf16"] + [x for x in configs if x != "bf16"]:
            res["quality"][c] = child("quality", {**opts, "config": c, "reference": str(ref)}, opts["timeout"])
            print(c, json.dumps(res["quality"][c])[:300], flush=True)
            save()
        runs = [("capacity-bound", opts["serve_kv_mib"], "bound"), ("everything fits", opts["free_kv_mib"], "free")]
        for name, mib, part in runs:
            if part in skip or "serve" in skip:
                continue
            res["serve"][name] = {}
            serve_all(opts, name, mib, res["serve"][name], save)
    finally:
        ref.unlink(missing_ok=True)
    return save()
