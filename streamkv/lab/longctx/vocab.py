"""Random keys, values and words, drawn as RULER draws them, from a caller's ``random.Random``.

Words come from the lists shipped inside the ``wonderwords`` wheel (what RULER reads), read from the
installed package's files: nothing is downloaded.
"""

from __future__ import annotations

import random
import string
import uuid
from functools import cache
from importlib import resources

from ...kv.errors import ConfigError


@cache
def wordlist(name: str) -> tuple[str, ...]:
    """One of wonderwords' lists ("noun", "adjective", "verb"), one entry a line."""
    try:
        assets = resources.files("wonderwords") / "assets"
        text = (assets / f"{name}list.txt").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ConfigError(f"the RULER tasks need the wonderwords word lists ({e}); run: pip install wonderwords") from e
    return tuple(word.strip() for word in text.splitlines() if word.strip())


@cache
def common_words() -> tuple[str, ...]:
    """RULER's word pool for common-words extraction: nouns, adjectives and verbs, deduplicated, sorted."""
    return tuple(sorted(set(wordlist("noun") + wordlist("adjective") + wordlist("verb"))))


def number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def word(rng: random.Random) -> str:
    """An adjective-noun key such as "fancy-lamp" (RULER pairs every adjective with every noun)."""
    return f"{rng.choice(wordlist('adjective'))}-{rng.choice(wordlist('noun'))}"


def uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


DRAW = {"numbers": number, "words": word, "uuids": uuid4}


def letters(rng: random.Random, k: int, alphabet: str = string.ascii_uppercase) -> str:
    """A made-up name: a variable of variable tracking (upper case) or a coded word of fwe (lower case)."""
    return "".join(rng.choices(alphabet, k=k))


def distinct(draw, count: int, taken: set[str]) -> list[str]:
    """``count`` draws of ``draw()`` unlike each other and unlike anything in ``taken`` (which grows)."""
    out = []
    while len(out) < count:
        item = draw()
        if item not in taken:
            taken.add(item)
            out.append(item)
    return out
