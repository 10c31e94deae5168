"""Needle in a haystack, the eight NIAH tasks of RULER (``scripts/data/synthetic/niah.py``).

A needle reads "One of the special magic numbers for fancy-lamp is: 1234567."; the haystack is RULER's
noise lines, prose passed in by the caller (RULER's essays) or distractor needles. Unlike RULER, which
puts every needle at a random depth, the needle of the first answer goes at the requested ``depth`` so a
depth sweep measures what it names; the other needles (distractors, further values or queried keys) still
go at depths drawn from RULER's 40-point grid. Keys and values are distinct within a prompt and absent
from the prose, so each answer occurs in the context exactly once.
"""

from __future__ import annotations

import random

from .sizing import Prose, fit, interleave
from .spec import NIAH, NOISE, frame
from .vocab import DRAW

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # RULER's np.linspace(0, 100, 40), in percent


def niah(task: str, tokenizer, length: int, depth: float, rng: random.Random, prose: Prose | None = None,
         guess: int | None = None) -> tuple[str, str, list[str], int]:  # fmt: skip
    """One NIAH prompt: ``(context, question, references, size)``; ``size`` seeds the next prompt's search."""
    spec = NIAH[task]
    taken: set[str] = set()

    def fresh(kind: str, source: random.Random) -> str:
        while True:
            item = DRAW[kind](source)
            if item not in taken and (prose is None or item not in prose.text):
                taken.add(item)
                return item

    def needle(key: str, value: str) -> str:
        return NEEDLE.format(type_needle_v=spec.value, key=key, value=value)

    keys = [fresh(spec.key, rng) for _ in range(max(spec.keys, spec.queries))]
    values = [[fresh(spec.value, rng) for _ in range(spec.values)] for _ in keys]
    asked = rng.sample(range(len(keys)), spec.queries)
    references = [value for i in asked for value in values[i]]
    first = needle(keys[asked[0]], references[0])
    others = [needle(key, value) for key, vs in zip(keys, values) for value in vs if value != references[0]]
    needles = [(depth, first), *zip((d / 100 for d in rng.sample(DEPTHS, len(others))), others)]

    queries = [keys[i] for i in asked]
    query = f"{', '.join(queries[:-1])}, and {queries[-1]}" if len(queries) > 1 else queries[0]
    single = spec.queries * spec.values == 1
    head, question = frame(
        "niah", singular=single, type_needle_v=spec.value[:-1] if single else spec.value, query=query
    )

    if spec.haystack == "essay":
        start = prose.start(rng, length)

        def build(n: int) -> tuple[str, str]:
            return head + prose.cut(start, n, needles) + "\n", question

    else:
        pool: list[str] = []
        distractors = random.Random(rng.getrandbits(64))

        def build(n: int) -> tuple[str, str]:
            if spec.haystack == "noise":
                units = [NOISE] * n
            else:  # a haystack of needles with keys and values of their own
                while len(pool) < n:
                    pool.append(needle(fresh(spec.key, distractors), fresh(spec.value, distractors)))
                units = pool[:n]
            return head + interleave(units, needles) + "\n", question

    size = fit(tokenizer, build, 1, length, length, task, guess)
    context, question = build(size)
    return context, question, references, size
