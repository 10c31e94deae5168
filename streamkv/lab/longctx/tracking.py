"""Variable tracking, RULER's ``vt`` (``scripts/data/synthetic/variable_tracking.py``): multi-hop tracing.

One chain ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ... (4 hops, 5 variables) is hidden line by line
in the noise haystack; the answer is every variable that ends up holding the value. As in RULER the
prompt opens with one solved example (a 3-letter chain in about 500 tokens of noise), then the task.
"""

from __future__ import annotations

import random

from .sizing import fit
from .spec import NOISE, frame
from .vocab import distinct, letters, number

HOPS = 4  # synthetic.yaml: num_chains 1, num_hops 4
EXAMPLE_TOKENS = 500  # RULER sizes its in-context example to 500 tokens


def chain(names: list[str], value: str) -> list[str]:
    """RULER's assignments, with its trailing space after each ``VAR X = VAR Y``."""
    return [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(len(names) - 1)]


def hide(assignments: list[str], n: int, layout: int) -> str:
    """``n`` noise lines with the assignments on lines of their own, in order, at random places."""
    lines = [NOISE] * n
    for j, at in enumerate(sorted(random.Random(layout).sample(range(n), len(assignments)))):
        lines.insert(at + j, assignments[j])
    return "\n".join(lines).replace(". \n", ".\n")


def variable_tracking(
    tokenizer, length: int, rng: random.Random, guess: int | None = None
) -> tuple[str, str, list[str], int]:
    """One vt prompt: ``(context, question, references, size)``."""
    taken = {"VAR"}
    names = distinct(lambda: letters(rng, 5), HOPS + 1, taken)
    shown = distinct(lambda: letters(rng, 3), HOPS + 1, taken)
    value, shown_value = distinct(lambda: number(rng, 5), 2, set())
    layout, shown_layout = rng.getrandbits(64), rng.getrandbits(64)

    def prompt(names: list[str], value: str, layout: int):
        head, question = frame("variable_tracking", query=value, num_v=HOPS + 1)
        return lambda n: (head + hide(chain(names, value), n, layout) + "\n", question)

    example = prompt(shown, shown_value, shown_layout)
    n = fit(tokenizer, example, HOPS + 1, EXAMPLE_TOKENS, EXAMPLE_TOKENS, "vt's example")
    solved = "".join(example(n)) + " " + " ".join(shown) + "\n"  # RULER: input + " " + answer + "\n"
    task = prompt(names, value, layout)

    def build(n: int) -> tuple[str, str]:
        context, question = task(n)
        return solved + "\n" + context, question

    size = fit(tokenizer, build, HOPS + 1, length, length, "vt", guess)
    context, question = build(size)
    return context, question, names, size
