"""Weights & Biases: one run per job, offline unless the environment says otherwise, never fatal.

Online mode first checks that the W&B server answers (:func:`streamkv.lab.runs.network.wandb_answers`, a
bounded probe) and logs offline when it does not; ``init_timeout`` bounds ``wandb.init`` itself.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..registry import register
from ..runs import network

log = logging.getLogger(__name__)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


@register("logger", "wandb")
@dataclass
class WandbLogger:
    """``mode``: online | offline | disabled; empty = ``$WANDB_MODE``, else online with an API key, else offline.

    ``group`` defaults to the sweep name in a multirun, ``job_type`` to the task, ``tags`` to the chosen
    components. Any W&B failure is logged as a warning and the run goes on.
    """

    project: str = "streamkv"
    entity: Optional[str] = None
    mode: Optional[str] = None
    group: Optional[str] = None
    job_type: Optional[str] = None
    tags: list = field(default_factory=list)
    init_timeout: float = 15.0  # seconds wandb.init waits for its service (W&B's default: 90)

    def __post_init__(self) -> None:
        self._run = None

    def resolved_mode(self) -> str:
        if self.mode:
            return self.mode
        if os.environ.get("WANDB_MODE"):
            return os.environ["WANDB_MODE"]
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"

    def start(self, *, config: dict, run_dir: str, name: str, group: str | None, job_type: str, tags: list) -> None:
        mode = self.resolved_mode()
        if mode == "online" and not network.wandb_answers():
            log.warning("W&B did not answer within %g s: logging offline (wandb sync uploads it later)", network.probe_seconds())
            mode = "offline"
        try:
            import wandb

            self._run = wandb.init(
                project=self.project,
                entity=self.entity,
                mode=mode,
                settings=wandb.Settings(init_timeout=self.init_timeout),
                dir=run_dir,
                name=name,
                group=self.group or group,
                job_type=self.job_type or job_type,
                tags=list(self.tags) + list(tags),
                config=config,
                reinit="finish_previous",
            )
        except Exception as e:  # noqa: BLE001 - logging must never fail the run
            log.warning("W&B disabled for this run: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            self._run = None

    def log(self, results: dict) -> None:
        if self._run is None:
            return
        try:
            flat = flatten({k: v for k, v in results.items() if k in ("metrics", "speed", "compression", "lm_eval")})
            self._run.summary.update(flat)
            self._run.log(flat)
        except Exception as e:  # noqa: BLE001
            log.warning("W&B logging failed: %s", e)

    def finish(self) -> None:
        if self._run is not None:
            try:
                self._run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("W&B finish failed: %s", e)
            self._run = None
