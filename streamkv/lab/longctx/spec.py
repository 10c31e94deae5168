"""RULER's synthetic tasks as data: the record of one prompt, the task table and RULER's own templates.

Templates, answer prefixes and generation lengths are copied from RULER
(``scripts/data/synthetic/constants.py``), the per-task settings from ``scripts/synthetic.yaml``, so a
prompt here reads word for word like RULER's ``base`` template (no chat template). A prompt is split the
way kvpress splits RULER: ``context`` is everything up to the question (the part that gets compressed),
``question`` is the question followed by the answer prefix.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One prompt; ``dataclasses.asdict`` makes it JSON."""

    task: str
    length: int  # target length in the model's own tokens: context + question, no special tokens
    depth: float | None  # where the (first) needle sits in the haystack, 0 = start .. 1 = end
    context: str  # everything before the question: what gets compressed
    question: str  # RULER's question and answer prefix, appended after the context
    references: list[str]
    max_new_tokens: int  # RULER's tokens_to_generate
    metric: str  # "all" (string_match_all) or "part" (string_match_part)
    seed: int


@dataclass(frozen=True)
class Needles:
    """A NIAH configuration, named as in RULER's synthetic.yaml."""

    haystack: str  # "noise" (repeated sentences), "essay" (prose passed in) or "needle" (distractor needles)
    key: str  # "words" (adjective-noun) or "uuids"
    value: str  # "numbers" (7 digits) or "uuids"
    keys: int = 1  # num_needle_k: needles with different keys (the unasked ones are distractors)
    values: int = 1  # num_needle_v: values per key, all asked for
    queries: int = 1  # num_needle_q: keys asked together


NIAH = {
    "niah_single_1": Needles("noise", "words", "numbers"),
    "niah_single_2": Needles("essay", "words", "numbers"),
    "niah_single_3": Needles("essay", "words", "uuids"),
    "niah_multikey_1": Needles("essay", "words", "numbers", keys=4),
    "niah_multikey_2": Needles("needle", "words", "numbers"),
    "niah_multikey_3": Needles("needle", "uuids", "uuids"),
    "niah_multivalue": Needles("essay", "words", "numbers", values=4),
    "niah_multiquery": Needles("essay", "words", "numbers", queries=4),
}
FAMILY = {**{task: "niah" for task in NIAH}, "vt": "variable_tracking", "cwe": "common_words_extraction",
          "fwe": "freq_words_extraction"}  # fmt: skip
TASKS: tuple[str, ...] = tuple(FAMILY)
PROSE_TASKS = tuple(task for task, spec in NIAH.items() if spec.haystack == "essay")

# RULER's scripts/data/synthetic/constants.py, verbatim.
TEMPLATES = {
    "niah": {
        "tokens_to_generate": 128,
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: ",
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
}  # fmt: skip
# RULER's scripts/eval/synthetic/constants.py: every synthetic task is scored with string_match_all.
METRIC = {"niah": "all", "variable_tracking": "all", "common_words_extraction": "all", "freq_words_extraction": "all"}

# The noise haystack of NIAH and variable tracking (RULER's type_haystack=noise): one unit per line.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def frame(family: str, singular: bool = False, **fields) -> tuple[str, str]:
    """RULER's template and answer prefix filled in, split around the haystack: ``(head, question)``.

    The prompt is ``head + haystack + "\\n" + question``; ``singular`` applies RULER's rewrite for a NIAH
    prompt with a single answer ("Some ... are" becomes "A ... is"), before the fields are filled in, as
    RULER does, so that keys are never rewritten.
    """
    spec = TEMPLATES[family]
    template = spec["template"] + spec["answer_prefix"]
    if singular:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(old, new)
    head, tail = template.format(context="\0", **fields).split("\0")
    return head, tail.removeprefix("\n")  # every RULER template has "\n" right after the context
