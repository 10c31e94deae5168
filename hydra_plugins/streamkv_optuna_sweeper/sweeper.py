"""Ask Optuna for trials, launch them as Hydra jobs through the configured launcher, tell the results.

The search space is written in Hydra's override grammar (``choice``, ``range``, ``interval``,
``int(interval(...))``, ``tag(log, interval(...))``), in ``hydra.sweeper.params`` or on the command
line; plain overrides are passed to every trial. A failed trial is told as failed and the study goes
on. The best trial (feasible first) is written to ``<sweep dir>/optimization_results.yaml``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from streamkv.lab.tuning import Budget, objective

from .config import OptunaSweeperConf  # noqa: F401  (stores the schema)

log = logging.getLogger(__name__)

Suggest = Callable[[optuna.Trial], Any]


def distribution(key: str, override: Override) -> Suggest:
    """How a trial suggests ``key``, from a sweep override's value."""
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        return lambda t: t.suggest_categorical(key, list(sweep.list))
    if isinstance(sweep, RangeSweep):
        values = list(override.sweep_iterator())
        if all(isinstance(v, int) for v in values):
            return lambda t: t.suggest_int(key, values[0], values[-1], step=int(sweep.step))
        return lambda t: t.suggest_float(key, values[0], values[-1], step=float(sweep.step))
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return lambda t: t.suggest_int(key, sweep.start, sweep.end, log=log_scale)
        return lambda t: t.suggest_float(key, float(sweep.start), float(sweep.end), log=log_scale)
    raise ValueError(f"{override.input_line}: the tuner takes choice(...), range(...) or interval(...)")


def as_override(key: str, value: Any) -> str:
    return f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}"


class OptunaSweeper(Sweeper):
    def __init__(self, objective: str, direction: str, n_trials: int, n_jobs: int, seed: Optional[int],
                 n_startup_trials: int, study_name: Optional[str], storage: Optional[str], budget: DictConfig,
                 params: DictConfig) -> None:
        self.objective, self.direction = objective, direction
        self.n_trials, self.n_jobs = n_trials, max(1, n_jobs)
        self.seed, self.n_startup_trials = seed, n_startup_trials
        self.study_name, self.storage = study_name, storage
        self.budget = Budget(**OmegaConf.to_container(budget))
        self.params = {str(k): str(v) for k, v in (params or {}).items()}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def space(self, arguments: list[str]) -> tuple[dict[str, Suggest], list[str]]:
        """(the search space, the fixed overrides); the command line wins over ``params``."""
        parser = OverridesParser.create()
        given = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()]) + parser.parse_overrides(arguments)
        space: dict[str, Suggest] = {}
        fixed: dict[str, str] = {}
        for o in given:
            key = o.get_key_element()
            space.pop(key, None)
            fixed.pop(key, None)
            if o.is_sweep_override():
                space[key] = distribution(key, o)
            else:
                fixed[key] = o.input_line
        return space, list(fixed.values())

    def sweep(self, arguments: list[str]) -> list:
        space, fixed = self.space(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        study = optuna.create_study(
            study_name=self.study_name or str(self.config.get("name", "tune")),
            storage=self.storage,
            load_if_exists=True,
            direction=self.direction,
            sampler=optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.n_startup_trials),
        )
        log.info("Optuna: %d trials over %s (budget %s <= %s)", self.n_trials, list(space), self.budget.metric,
                 self.budget.max)
        returns, launched = [], 0
        while launched < self.n_trials:
            trials = [study.ask() for _ in range(min(self.n_jobs, self.n_trials - launched))]
            for t in trials:
                t.set_user_attr("overrides", [as_override(k, suggest(t)) for k, suggest in space.items()])
            batch = [fixed + t.user_attrs["overrides"] for t in trials]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=launched)
            for trial, ret in zip(trials, results):
                self.tell(study, trial, ret)
            returns.append(results)
            launched += len(batch)
        self.write_best(study, sweep_dir / "optimization_results.yaml")
        return returns

    def tell(self, study: optuna.Study, trial: optuna.Trial, ret) -> None:
        if ret.status != JobStatus.COMPLETED:
            log.warning("trial %d failed: %s", trial.number, ret._return_value)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        try:
            value, attrs = objective(ret.return_value, self.objective, self.budget, self.direction)
        except KeyError as e:
            log.warning("trial %d: %s", trial.number, e)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        study.tell(trial, value)

    def write_best(self, study: optuna.Study, path: Path) -> None:
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            log.warning("Optuna: no trial completed")
            return
        pool = [t for t in done if t.user_attrs.get("feasible")] or done
        best = (min if self.direction == "minimize" else max)(pool, key=lambda t: t.value)
        summary = {
            "name": "optuna",
            "objective": self.objective,
            "budget": {"metric": self.budget.metric, "max": self.budget.max, "penalty": self.budget.penalty},
            "best_overrides": best.user_attrs["overrides"],  # ready to paste after `python -m runners.eval`
            "best_value": best.value,
            "best_trial": {"number": best.number, **best.user_attrs},
            "trials": len(study.trials),
            "completed": len(done),
            "feasible": sum(bool(t.user_attrs.get("feasible")) for t in done),
        }
        OmegaConf.save(OmegaConf.create(summary), path)
        log.info("Optuna: best %s=%.4g with %s (%s)", self.objective, best.user_attrs.get("raw", best.value),
                 " ".join(best.user_attrs["overrides"]), path)
