"""The tuner's objective: a metric of a job's results under a budget on another (e.g. ppl under avg bits).

Kept apart from the Hydra sweeper plugin so that it is plain, testable library code: the sweeper only
asks, launches and tells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional


def lookup(results: dict, dotted: str) -> float:
    """``results["metrics"]["ppl"]`` for ``"metrics.ppl"``; a missing key is a one-line KeyError."""
    node: Any = results
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"the job's results have no {dotted!r} (missing {part!r})")
        node = node[part]
    return float(node)


@dataclass
class Budget:
    """``metric`` may not exceed ``max`` (``None``: no budget). A trial over it keeps running but its
    objective is worsened by ``penalty`` per unit over: ppl x (1 + penalty x excess) when minimising
    (÷ when maximising), so TPE learns where the budget lies instead of losing the trial."""

    metric: str = "compression.avg_bits"
    max: Optional[float] = None
    penalty: float = 1.0

    def excess(self, results: dict) -> float:
        if self.max is None:
            return 0.0
        try:
            used = lookup(results, self.metric)
        except KeyError:  # an uncompressed job has no compression stats: treat it as 16-bit
            used = 16.0
        return max(0.0, used - self.max)


def objective(results: dict, metric: str, budget: Budget, direction: str = "minimize") -> tuple[float, dict]:
    """(the value to tell the study, attributes to record on the trial)."""
    raw = lookup(results, metric)
    excess = budget.excess(results)
    factor = 1.0 + budget.penalty * excess
    value = raw * factor if direction == "minimize" else raw / factor
    attrs = {"raw": raw, "excess": excess, "feasible": excess == 0.0}
    if budget.max is not None:
        try:
            attrs[budget.metric] = lookup(results, budget.metric)
        except KeyError:
            pass
    return (value if math.isfinite(value) else float("inf")), attrs
