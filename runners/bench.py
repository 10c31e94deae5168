"""Benchmark KV-cache methods side by side: ``python -m runners.bench [overrides]``.

Every method of ``conf/bench.yaml`` at each of its bit widths: streaming perplexity, stored bits and
bytes, prefill/decode throughput against transformers' DynamicCache, and peak memory. Writes
``bench.md``, ``bench.csv``, ``bench.json`` and ``bench_pareto.png`` into the run directory.

Examples::

    python -m runners.bench                                   # the full benchmark (embedded model, wikitext-2)
    python -m runners.bench preset=tiny                       # a quick pass: small windows, short prompts
    python -m runners.bench run=[baseline,streamkv,hf_quanto] bits=[4] repeats=1
    python -m runners.bench measure=[ppl]                     # quality and memory only
"""

from __future__ import annotations

import logging
import shlex
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from streamkv.lab import registry
from streamkv.lab.bench.run import run_bench
from streamkv.lab.paths import CONF_DIR
from streamkv.lab.runs import cli

registry.load_builtins()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
@cli.task_wrapper
def main(cfg: DictConfig) -> dict:
    logging.getLogger("streamkv").setLevel(logging.INFO)
    run_dir = HydraConfig.get().runtime.output_dir
    command = "python -m runners.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results = run_bench(cfg, run_dir, command=command.strip())
    print(open(f"{run_dir}/bench.md").read(), flush=True)
    print(f"results: {run_dir}/bench.md, bench.csv, bench.json, bench_pareto.png", flush=True)
    return results


if __name__ == "__main__":
    cli.launch(main)
