"""Passkey retrieval: a random number hidden at a chosen depth of filler text of a chosen token length.

The test that long-context KV compression most easily fails: one fact, a single exact answer, and the
distance from the fact to the question set by ``depth`` (0 = the fact comes first, 1 = just before the
question). The filler is the classic repeated sentences or a random stretch of the run's own text.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it afterwards.\n\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"
REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FILLERS = ("repeat", "text")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def overhead(tokenizer, key: int = 99999) -> int:
    """Prompt tokens that are not filler (intro, needle, question)."""
    return sum(len(_encode(tokenizer, s)) for s in (INTRO, NEEDLE.format(key=key), QUESTION))


def passkey_prompt(tokenizer, filler_ids: list[int], length: int, depth: float, key: int) -> dict:
    """A prompt of about ``length`` tokens with ``key`` after ``depth`` of its filler tokens.

    ``filler_ids`` (long enough, see :func:`passkey_docs`) are cut to the budget left by the fixed parts;
    ``needle_depth`` records where the needle really landed, in filler tokens.
    """
    budget = length - overhead(tokenizer, key)
    if budget < 1:
        raise ValueError(f"a passkey prompt needs more than {length} tokens")
    ids = filler_ids[:budget]
    cut = round(depth * len(ids))
    before, after = tokenizer.decode(ids[:cut]).rstrip(), tokenizer.decode(ids[cut:])
    needle = NEEDLE.format(key=key)
    body = f"{before} {needle}" if before else needle
    return {
        "input": INTRO + body + after + QUESTION,
        "target": str(key),
        "depth": float(depth),
        "needle_depth": cut / len(ids),
        "length": length,
    }


def passkey_docs(
    tokenizer, length: int, depths: Sequence[float], samples: int, seed: int = 0, text: str | None = None
) -> list[dict]:
    """``samples`` prompts per depth, ordered sample by sample (so a document limit keeps every depth).

    ``text=None`` fills with :data:`REPEAT`; otherwise each prompt takes a random stretch of ``text``.
    """
    rng = random.Random(seed)
    source = _encode(tokenizer, text if text is not None else REPEAT * 8)
    if not source:
        raise ValueError("the passkey filler text is empty")
    source = source * (length // len(source) + 2)  # long enough for any budget and start
    docs = []
    for _ in range(samples):
        for depth in depths:
            start = rng.randrange(len(source) - length) if text is not None else 0
            docs.append(passkey_prompt(tokenizer, source[start:], length, depth, rng.randrange(10_000, 100_000)))
    return docs


def passkey_match(generation: str, key: str) -> bool:
    """Exact match: the first number in the generation is the key."""
    found = re.search(r"\d+", generation)
    return found is not None and found.group() == str(key)
