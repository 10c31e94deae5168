"""RULER's scores (``scripts/eval/synthetic/constants.py``, as kvpress computes them), for one prediction.

A reference counts as found when it occurs anywhere in the prediction, case-insensitively. RULER averages
these per-prompt scores over a task and reports them times 100.
"""

from __future__ import annotations

import re

from ...kv.errors import ConfigError

METRICS = ("all", "part")
CONTROL = re.compile(r"[\x00-\x1f]")


def clean(prediction: str) -> str:
    """RULER's ``postprocess_pred``: control characters become newlines, outer whitespace goes."""
    return CONTROL.sub("\n", prediction.strip()).strip()


def score(prediction: str, references: list[str], metric: str) -> float:
    """``"all"``: the fraction of references found (string_match_all); ``"part"``: 1.0 if any is (string_match_part)."""
    if metric not in METRICS:
        raise ConfigError(f"metric={metric!r} is not a RULER metric; choose one of {list(METRICS)}")
    if not references:
        raise ConfigError("references=[] is empty; a RULER prompt has at least one reference")
    text = clean(prediction).lower()
    found = [ref.lower() in text for ref in references]
    return sum(found) / len(found) if metric == "all" else float(any(found))
