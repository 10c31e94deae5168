"""RULER's synthetic tasks by name: :func:`generate` checks its inputs and lays out the prompts.

Every prompt has a random source of its own, seeded by (task, seed, sample index, depth), so the same
seed gives the same prompts whatever else is generated, and adding a depth or a sample changes no other.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from numbers import Real

from ...kv.errors import ConfigError
from .aggregation import common_words_extraction, freq_words_extraction
from .needles import niah
from .sizing import Prose
from .spec import FAMILY, METRIC, PROSE_TASKS, TASKS, TEMPLATES, Sample
from .tracking import variable_tracking

WHOLE = {"variable_tracking": variable_tracking, "common_words_extraction": common_words_extraction,
         "freq_words_extraction": freq_words_extraction}  # fmt: skip


def check(task: str, length: int, depths: Sequence[float], samples: int, haystack: str | None) -> list[float]:
    """Fail with one line on a bad input; the depths as floats."""
    if task not in FAMILY:
        raise ConfigError(f"task={task!r} is not a RULER task; choose one of {list(TASKS)}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"length={length!r} is not allowed; give a positive whole number of tokens")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples={samples!r} is not allowed; give a positive whole number of prompts")
    depths = list(depths)
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, Real) or math.isnan(depth) or not 0 <= depth <= 1:
            raise ConfigError(
                f"depth={depth!r} is outside [0, 1]; 0 puts the needle at the haystack's start, 1 at its end"
            )
    if FAMILY[task] == "niah" and not depths:
        raise ConfigError(f"depths=[] is empty; {task} needs at least one depth in [0, 1]")
    if task in PROSE_TASKS and (not isinstance(haystack, str) or not haystack.strip()):
        raise ConfigError(
            f"{task} hides its needles in prose: pass haystack=<a long text> (e.g. the run's text, such as wikitext-2)"
        )
    return [float(depth) for depth in depths]


def generate(task: str, tokenizer, length: int, depths: Sequence[float], samples: int, seed: int = 0,
             haystack: str | None = None) -> list[Sample]:  # fmt: skip
    """RULER prompts of ``length`` tokens (context + question, in ``tokenizer``'s tokens, as close as fits).

    Needle tasks give ``samples`` prompts per depth, ordered sample by sample (so a document limit keeps
    every depth); ``vt``, ``cwe`` and ``fwe`` give ``samples`` prompts with depth None. ``haystack`` is the
    prose of niah_single_2/3, niah_multikey_1, niah_multivalue and niah_multiquery (RULER's essays) and is
    ignored by the other tasks.
    """
    depths = check(task, length, depths, samples, haystack)
    family = FAMILY[task]
    prose = None
    if task in PROSE_TASKS:
        prose = Prose(haystack, tokenizer)
        if len(prose) < length:
            raise ConfigError(
                f"the haystack has {len(prose)} tokens; {task} at length={length} needs a prose text of at least {length} tokens"
            )
    made, guess = [], {}
    for i in range(samples):
        for depth in depths if family == "niah" else [None]:
            rng = random.Random(f"{task}/{seed}/{i}" + ("" if depth is None else f"/{depth!r}"))
            if family == "niah":
                context, question, references, guess[depth] = niah(
                    task, tokenizer, length, depth, rng, prose, guess.get(depth)
                )
            else:
                context, question, references, guess[depth] = WHOLE[family](tokenizer, length, rng, guess.get(depth))
            made.append(Sample(task=task, length=length, depth=depth, context=context, question=question,
                               references=list(references), max_new_tokens=TEMPLATES[family]["tokens_to_generate"],
                               metric=METRIC[family], seed=seed))  # fmt: skip
    return made
