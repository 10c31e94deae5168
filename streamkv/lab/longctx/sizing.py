"""Sizing a prompt to a length in the model's own tokens, and the prose haystack cut by token offsets.

RULER grows each haystack by a binary search over its size, tokenizing the whole prompt at every step.
Here a prompt is a function of one size ``n`` (noise lines, distractor needles, listed words, prose
tokens), and :func:`fit` finds the largest ``n`` whose prompt fits: secant steps land next to the answer in
two or three tokenizations, bisection finishes it, so a size that is only roughly monotone (a reshuffled
word list) still ends with a prompt that fits. Prose is tokenized once and cut by character offsets, as
:mod:`streamkv.lab.longctx.passkey` does, so a text is never decoded and any tokenizer round-trips.
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Callable

from ...kv.errors import ConfigError

# Where a needle may go in prose: the space after a sentence's end (RULER splits with nltk's sent_tokenize).
SENTENCE_END = re.compile(r"[.!?][\"')\]]* (?=\S)")


def tokens(tokenizer, text: str) -> int:
    """Length of ``text`` in the model's tokens, without special tokens."""
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def largest(size: Callable[[int], int], lo: int, hi: int, length: int, task: str, guess: int | None = None) -> int:
    """The largest ``n`` in ``[lo, hi]`` with ``size(n) <= length``, for a ``size`` that grows with ``n``."""
    known: dict[int, int] = {}

    def at(n: int) -> int:
        if n not in known:
            known[n] = size(n)
        return known[n]

    if at(lo) > length:
        raise ConfigError(f"length={length} is too small for {task}: its shortest prompt takes {known[lo]} tokens")
    good, bad = lo, hi + 1  # at(good) fits; bad is the smallest size known not to (hi + 1: none known)
    n = guess if guess is not None and lo < guess <= hi else min(hi, max(2 * lo, lo + 16))
    for step in range(200):
        if bad - good <= 1:
            break
        if at(n) <= length:
            good = n
        else:
            bad = n
        if bad - good <= 1:
            break
        slope = (at(n) - at(lo)) / (n - lo)  # n > lo always
        if step < 6 and slope > 0:  # where the line through the smallest and the latest prompt meets length
            n = lo + int((length - at(lo)) / slope)
            n = n if good < n < bad else (good + 1 if n <= good else bad - 1)
        else:
            n = (good + bad) // 2 if bad <= hi else min(hi, good + max(1, good - lo))
    return good


def fit(tokenizer, build: Callable[[int], tuple[str, str]], lo: int, hi: int, length: int, task: str,
        guess: int | None = None) -> int:  # fmt: skip
    """The largest size whose prompt ``build(n) = (context, question)`` fits in ``length`` tokens.

    Context and question are counted apart (how they are fed) and then, once, together, so the prompt
    fits however it is tokenized.
    """
    question = build(lo)[1]
    q = tokens(tokenizer, question)
    n = largest(lambda k: tokens(tokenizer, build(k)[0]) + q, lo, hi, length, task, guess)
    while n > lo and tokens(tokenizer, "".join(build(n))) > length:
        n -= 1
    return n


class Prose:
    """A prose haystack: whitespace folded to single spaces (as RULER folds its essays), tokenized once."""

    def __init__(self, text: str, tokenizer):
        self.text = re.sub(r"\s+", " ", text).strip()
        offsets = tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        self.starts = [a for a, _ in offsets["offset_mapping"]]
        self.ends = [b for _, b in offsets["offset_mapping"]]
        self.stops = [m.end() - 1 for m in SENTENCE_END.finditer(self.text)]  # the space after each sentence

    def __len__(self) -> int:
        return len(self.starts)

    def start(self, rng: random.Random, budget: int) -> int:
        """A random first token with ``budget`` tokens after it, moved to the next sentence's start if one is near."""
        first = rng.randrange(len(self) - budget + 1)
        i = bisect.bisect_left(self.stops, self.starts[first])
        if i < len(self.stops):
            sentence = bisect.bisect_left(self.starts, self.stops[i] + 1)
            if sentence <= len(self) - budget:
                return sentence
        return first

    def cut(self, start: int, size: int, needles: list[tuple[float, str]]) -> str:
        """``size`` tokens from token ``start``, each needle at the sentence end nearest its depth.

        Depth 0 puts a needle before the first sentence, 1 after the last; needles at one place keep their
        order. Pieces are joined by single spaces, as RULER joins sentences and needles.
        """
        a, b = self.starts[start], self.ends[start + size - 1]
        lo, hi = bisect.bisect_right(self.stops, a), bisect.bisect_left(self.stops, b)
        places = [a, *self.stops[lo:hi], b]
        chosen = []
        for order, (depth, needle) in enumerate(needles):
            t = round(depth * size)
            target = self.starts[start + t] if t < size else b
            i = bisect.bisect_left(places, target)
            near = min(places[max(i - 1, 0) : i + 1], key=lambda p: abs(p - target))
            chosen.append((near, order, needle))
        parts, prev = [], a
        for at, _, needle in sorted(chosen):
            parts += [self.text[prev:at].strip(), needle]
            prev = at
        parts.append(self.text[prev:b].strip())
        return " ".join(p for p in parts if p)


def interleave(units: list[str], needles: list[tuple[float, str]]) -> str:
    """Lines of ``units`` with each needle on its own line before unit ``round(depth * len(units))``.

    RULER's noise and needle haystacks: one line a unit, needles inserted between units.
    """
    n = len(units)
    at = sorted((round(depth * n), order, needle) for order, (depth, needle) in enumerate(needles))
    lines, j = [], 0
    for i in range(n + 1):
        while j < len(at) and at[j][0] == i:
            lines.append(at[j][2])
            j += 1
        if i < n:
            lines.append(units[i])
    return "\n".join(lines)
