"""Evaluate a model with a composed KV compression: ``python -m runners.eval [overrides]``.

Examples::

    python -m runners.eval                                 # seed method, embedded model, pydoc text
    python -m runners.eval quantizer=none                  # the uncompressed baseline
    python -m runners.eval data=wikitext2                  # wikitext-2 (a local copy: STREAMKV_WIKITEXT=...)
    python -m runners.eval -m quantizer.key_bits=2,3,4     # a multirun sweep
    python -m runners.sweep ablation                       # a named sweep from sweeps/ (runs this app)
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from streamkv.lab import registry, schema  # noqa: F401  (schema: registers the primary config's schema)
from streamkv.lab.paths import CONF_DIR
from streamkv.lab.runs import cli
from streamkv.lab.runs.job import run_job, summary

registry.load_builtins()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
@cli.task_wrapper
def main(cfg: DictConfig) -> dict:
    """Run one job; the results dict is returned so a sweeper (e.g. the Optuna tuner) can read its objective."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    results = run_job(cfg, hc.runtime.output_dir, choices=hc.runtime.choices, group=cfg.name if multirun else None)
    print(summary(results, hc.runtime.output_dir), flush=True)
    return results


if __name__ == "__main__":
    cli.launch(main)
