"""Serve with streamkv's vLLM plugin against stock vLLM (CPU), side by side: ``python -m runners.serve_bench``.

Runs in the vLLM venv (``bash tools/vllm_env.sh``; no Hydra there, so plain options)::

    python -m runners.serve_bench                                   # everything (~40 min on 2 cores)
    python -m runners.serve_bench --configs bf16,k4v4 --skip serve  # capacity and quality only
    python -m runners.serve_bench --skip quality --repeats 2       # serving runs twice each (ABC CBA), fastest kept

Per configuration (stock bf16, vLLM's fp8 cache, the plugin's presets), on the embedded model: KV
blocks from the same budget, perplexity / KL / top-1 / greedy tokens on the README protocol through
vLLM's prompt log-probs, and serving runs with a KV budget too small for bf16 and one where everything
fits (``streamkv.lab.serving``). Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from streamkv.kv.errors import check
from streamkv.lab.runs.args import ArgumentParser, run_main
from streamkv.lab.serving.run import run

CONFIGS = "bf16,fp8,k8v8,k8v4,k4v4,k4v2,k2v2"
SERVE_CONFIGS = "bf16,fp8,k8v4,k4v4"
MODEL = Path(os.environ.get("STREAMKV_CACHE", Path.home() / ".cache" / "streamkv")) / "smollm2-135m-instruct"


def options(argv: list[str]) -> argparse.Namespace:
    ap = ArgumentParser(prog="python -m runners.serve_bench", description=__doc__.split("\n")[0])
    add = ap.add_argument
    add("--out", default="outputs/serve_bench")
    add("--model", default=str(MODEL), help="a model directory (python -m streamkv.lab.models.embedded)")
    add("--text", default=os.environ.get("STREAMKV_WIKITEXT", ""), help="wikitext-2-raw test.txt")
    add("--configs", default=CONFIGS)
    add("--serve-configs", default=SERVE_CONFIGS)
    add("--skip", default="", help="comma list of parts to skip: quality, serve (both runs), bound, free")
    add("--kv-space", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB) of the quality runs")
    add("--windows", type=int, default=8)
    add("--window", type=int, default=2048)
    add("--chunk", type=int, default=512)
    add("--greedy-prompt", type=int, default=1311)
    add("--greedy-tokens", type=int, default=32)
    add("--requests", type=int, default=16)
    add("--prompt", type=int, default=1536)
    add("--output", type=int, default=256)
    add("--serve-chunk", type=int, default=1024)
    add("--serve-kv-mib", type=int, default=256, help="KV budget of the capacity-bound run")
    add("--free-kv-mib", type=int, default=1024, help="KV budget where every request fits")
    add("--repeats", type=int, default=1, help="runs of each serving configuration (ABC CBA order; the fastest kept)")
    add("--timeout", type=int, default=3600, help="seconds per subprocess")
    return ap.parse_args(argv)


def main(argv: list[str]) -> None:
    a = options(argv)
    check(Path(a.text).is_file(), f"--text / $STREAMKV_WIKITEXT={a.text!r} is not a file (wikitext-2-raw test.txt)")
    check((Path(a.model) / "config.json").is_file(),
          f"--model {a.model} is not a model directory (python -m streamkv.lab.models.embedded)")
    check(a.repeats >= 1, f"--repeats {a.repeats}: runs of each serving configuration, at least 1")
    opts = {k: v for k, v in vars(a).items() if k != "out"}
    command = "python -m runners.serve_bench " + " ".join(shlex.quote(x) for x in argv)
    print(run(opts, Path(a.out), command.strip()))


if __name__ == "__main__":
    run_main(main)
