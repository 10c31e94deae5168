"""Evaluate a model with a composed KV compression: ``python -m runners.eval [overrides]``.

Examples::

    python -m runners.eval                                 # seed method, embedded model, pydoc text
    python -m runners.eval quantizer=none                  # the uncompressed baseline
    python -m runners.eval data=wikitext2 data.path=../shared/data/wikitext-2-raw/test.txt
    python -m runners.eval -m quantizer.key_bits=2,3,4     # a multirun sweep
    python -m runners.sweep ablation                       # a named sweep from sweeps/ (runs this app)
"""

from __future__ import annotations

from . import _cli  # noqa: F401  (one-line errors)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import streamkv.schema  # noqa: E402,F401  (registers the primary schema)
from streamkv import registry  # noqa: E402
from streamkv.experiment import run_job, summary  # noqa: E402

registry.load_builtins()


@hydra.main(version_base="1.3", config_path=_cli.CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> dict:
    """Run one job; the results dict is returned so a sweeper (e.g. the Optuna tuner) can read its objective."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        results = run_job(cfg, hc.runtime.output_dir, choices=hc.runtime.choices, group=cfg.name if multirun else None)
    except Exception as e:
        if multirun:  # recorded in the job's failed.json; Hydra runs the other jobs and reports at the end
            raise
        _cli.fail(e)  # one line, without Hydra's "Error executing job" before it
    print(summary(results, hc.runtime.output_dir), flush=True)
    return results


if __name__ == "__main__":
    main()
