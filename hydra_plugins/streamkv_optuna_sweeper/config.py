"""The sweeper's config schema, stored as ``hydra/sweeper/streamkv_optuna``."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class BudgetConf:
    metric: str = "compression.avg_bits"  # a dotted key of the job's results
    max: Optional[float] = None  # null: no budget
    penalty: float = 1.0  # objective x (1 + penalty x excess) for a trial over the budget


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.streamkv_optuna_sweeper.sweeper.OptunaSweeper"
    objective: str = "metrics.ppl"  # a dotted key of the results the task function returns
    direction: str = "minimize"
    n_trials: int = 20
    n_jobs: int = 1  # trials asked and launched together (a launcher like joblib runs them in parallel)
    seed: Optional[int] = 0  # TPE's seed: the same seed proposes the same trials
    n_startup_trials: int = 5  # random trials before TPE models the results
    study_name: Optional[str] = None  # default: the sweep's name
    storage: Optional[str] = None  # e.g. sqlite:///outputs/sweeps/tune/study.db to keep the study across runs
    budget: BudgetConf = field(default_factory=BudgetConf)
    params: Dict[str, Any] = field(default_factory=dict)  # key: choice(...) | range(...) | interval(...)


ConfigStore.instance().store(group="hydra/sweeper", name="streamkv_optuna", node=OptunaSweeperConf, provider="streamkv")
