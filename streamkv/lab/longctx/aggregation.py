"""RULER's aggregation tasks: common-words extraction (``cwe``) and frequent-words extraction (``fwe``).

Both ask for the most repeated words of a long list, so every part of the context matters (nothing to
retrieve, everything to count): the KV compression stress opposite to a single needle.
"""

from __future__ import annotations

import math
import random
import string

from ...kv.errors import ConfigError
from .sizing import fit, tokens
from .spec import frame
from .vocab import common_words, distinct, letters

COMMON = 10  # synthetic.yaml: num_cw 10


def numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def word_list(common: list[str], rare: list[str], often: int, seldom: int, shuffle: int) -> str:
    """RULER's ``get_example``: the common words ``often`` times, the rest ``seldom`` times, shuffled, numbered."""
    words = common * often + rare * seldom
    random.Random(shuffle).shuffle(words)
    return numbered(words)


def common_words_extraction(
    tokenizer, length: int, rng: random.Random, guess: int | None = None
) -> tuple[str, str, list[str], int]:
    """One cwe prompt: ``(context, question, references, size)``, ``size`` the number of distinct words.

    RULER's settings: below 4096 tokens a 20-word solved example (3/1 repeats) and 6/1 repeats in the
    task, otherwise a 40-word example (10/3) and freq_cw=30, freq_ucw=3. The example's words are not
    reused in the task (RULER may reuse them), so copying the example's answer scores nothing.
    """
    shown, ex_often, ex_seldom, often, seldom = (20, 3, 1, 6, 1) if length < 4096 else (40, 10, 3, 30, 3)
    words = rng.sample(common_words(), len(common_words()))
    example, words = words[:shown], words[shown:]
    shown_shuffle, shuffle = rng.getrandbits(64), rng.getrandbits(64)
    head, question = frame("common_words_extraction", num_cw=COMMON, query="")
    solved = (head + word_list(example[:COMMON], example[COMMON:], ex_often, ex_seldom, shown_shuffle) + "\n"
              + question + " " + numbered(example[:COMMON]))  # fmt: skip

    def build(n: int) -> tuple[str, str]:
        listed = word_list(words[:COMMON], words[COMMON:n], often, seldom, shuffle)
        return solved + "\n" + head + listed + "\n", question

    size = fit(tokenizer, build, COMMON, len(words), length, "cwe", guess)
    if size == len(words):  # every word is listed and the prompt may still be short of length
        filled = tokens(tokenizer, "".join(build(size)))
        raise ConfigError(
            f"length={length} is too long for cwe: its {len(words)} distinct words fill only {filled} tokens"
        )
    context, question = build(size)
    return context, question, words[:COMMON], size


ALPHA = 2.0  # synthetic.yaml: fwe alpha
ZETA = math.pi**2 / 6  # zeta(2), RULER's scipy.special.zeta(alpha)
WORD_LENGTH = 6  # RULER's coded_wordlen


def counts(n: int, vocab: int) -> list[int]:
    """RULER's Zipf counts: ``int(n * k**-alpha / zeta(alpha))`` for the k-th word of the vocabulary."""
    return [int(n * k**-ALPHA / ZETA) for k in range(1, vocab + 1)]


def freq_words_extraction(
    tokenizer, length: int, rng: random.Random, guess: int | None = None
) -> tuple[str, str, list[str], int]:
    """One fwe prompt: ``(context, question, references, size)``, ``size`` RULER's ``num_words``.

    Coded words of 6 random letters, a vocabulary of length // 50 of them (RULER's default), Zipf counts;
    the most frequent word is the noise "..." and the answer is the next three. The smallest size keeps
    the three answers strictly more frequent than any other word, for this size and every larger one.
    """
    vocab = distinct(lambda: letters(rng, WORD_LENGTH, string.ascii_lowercase), max(length // 50, 5), set())
    vocab[0] = "..."  # RULER treats the top-ranked word as noise
    shuffle = rng.getrandbits(64)
    head, question = frame("freq_words_extraction", query="")

    def build(n: int) -> tuple[str, str]:
        words = [word for word, count in zip(vocab, counts(n, len(vocab))) for _ in range(count)]
        random.Random(shuffle).shuffle(words)
        return head + " ".join(words) + "\n", question

    least = math.ceil(1 / (4**-ALPHA / ZETA - 5**-ALPHA / ZETA))  # rank 4 outnumbers rank 5 from here on
    size = fit(tokenizer, build, least, 8 * length, length, "fwe", guess)
    context, question = build(size)
    return context, question, vocab[1:4], size
