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


def overhead(tokenizer, key: int = 99999) -> int:
    """Prompt tokens that are not filler (intro, needle, question)."""
    return sum(len(tokenizer.encode(s, add_special_tokens=False)) for s in (INTRO, NEEDLE.format(key=key), QUESTION))


def passkey_prompt(tokenizer, filler: str, offsets: list, length: int, depth: float, key: int) -> dict:
    """A prompt of about ``length`` tokens with ``key`` after ``depth`` of its filler tokens.

    ``filler`` is cut, by its tokens' character ``offsets``, to the budget left by the fixed parts (text
    is cut, never decoded, so any tokenizer round-trips); ``needle_depth`` is where the needle landed.
    """
    budget = length - overhead(tokenizer, key)
    if budget < 1 or len(offsets) < budget:
        raise ValueError(f"a passkey prompt of {length} tokens leaves no room for filler")
    span = offsets[:budget]
    cut = round(depth * budget)
    middle = span[cut][0] if cut < budget else span[-1][1]
    before, after = filler[span[0][0] : middle].rstrip(), filler[middle : span[-1][1]]
    needle = NEEDLE.format(key=key)
    body = f"{before} {needle}" if before else needle
    return {
        "input": INTRO + body + after + QUESTION,
        "target": str(key),
        "depth": float(depth),
        "needle_depth": cut / budget,
        "length": length,
    }


def passkey_docs(
    tokenizer, length: int, depths: Sequence[float], samples: int, seed: int = 0, text: str | None = None
) -> list[dict]:
    """``samples`` prompts per depth, ordered sample by sample (so a document limit keeps every depth).

    ``text=None`` fills with :data:`REPEAT`; otherwise each prompt starts at a random token of ``text``.
    """
    rng = random.Random(seed)
    filler = text if text is not None else REPEAT * 8
    if not filler.strip():
        raise ValueError("the passkey filler text is empty")
    while True:  # repeat the filler until any start leaves a whole prompt's worth of tokens
        offsets = tokenizer(filler, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) >= 2 * length:
            break
        filler = filler + " " + filler
    docs = []
    for _ in range(samples):
        for depth in depths:
            start = rng.randrange(len(offsets) - length) if text is not None else 0
            key = rng.randrange(10_000, 100_000)
            docs.append(passkey_prompt(tokenizer, filler, offsets[start:], length, depth, key))
    return docs


def passkey_match(generation: str, key: str) -> bool:
    """Exact match: the first number in the generation is the key."""
    found = re.search(r"\d+", generation)
    return found is not None and found.group() == str(key)
