"""The whole serving benchmark: every configuration's quality, then each serving run, side by side."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

from .measure import child
from .report import render


def run(opts: dict, out: Path, command: str) -> str:
    """Measure everything ``opts`` asks for into ``out`` (``results.json``, ``results.md``); the table."""
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, opts["skip"].split(",")))
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
           "host": platform.node(), "load_before": os.getloadavg(), "args": opts, "quality": {}, "serve": {}}
    ref = out / "stock_logprobs.f32"  # stock's full log-softmax rows, for KL; removed at the end
    ref.unlink(missing_ok=True)
    try:
        configs = opts["configs"].split(",")
        for c in [] if "quality" in skip else ["bf16"] + [x for x in configs if x != "bf16"]:
            res["quality"][c] = child("quality", {**opts, "config": c, "reference": str(ref)}, opts["timeout"])
            print(c, json.dumps(res["quality"][c])[:300], flush=True)
        runs = [("capacity-bound", opts["serve_kv_mib"], "bound"), ("everything fits", opts["free_kv_mib"], "free")]
        for name, mib, part in runs:
            if part in skip or "serve" in skip:
                continue
            res["serve"][name] = {}
            for c in opts["serve_configs"].split(","):
                res["serve"][name][c] = child("serve", {**opts, "config": c, "kv_mib": mib}, opts["timeout"])
                print(name, c, json.dumps(res["serve"][name][c]), flush=True)
    finally:
        ref.unlink(missing_ok=True)
    res["load_after"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(res, indent=1))
    text = render(res)
    (out / "results.md").write_text(text)
    return text
