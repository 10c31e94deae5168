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

from . import _cli  # noqa: F401  (one-line errors)

import logging  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from streamkv import bench, registry  # noqa: E402
from streamkv.kv.errors import ConfigError  # noqa: E402

registry.load_builtins()


@hydra.main(version_base="1.3", config_path=_cli.CONF_DIR, config_name="bench")
def main(cfg: DictConfig) -> dict:
    logging.getLogger("streamkv").setLevel(logging.INFO)
    run_dir = HydraConfig.get().runtime.output_dir
    command = "python -m runners.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        results = bench.run_bench(cfg, run_dir, command=command.strip())
    except ConfigError as e:
        _cli.fail(e)
    print((open(f"{run_dir}/bench.md").read()), flush=True)
    print(f"results: {run_dir}/bench.md, bench.csv, bench.json, bench_pareto.png", flush=True)
    return results


if __name__ == "__main__":
    main()
