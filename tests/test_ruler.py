"""RULER's synthetic tasks (streamkv.lab.longctx): sizes, needle placement, determinism, scoring, bad input.

Offline: the embedded model's tokenizer and, as prose haystack, the Python reference in pydoc_data.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re

import pytest

from streamkv.kv.errors import ConfigError
from streamkv.lab.longctx import TASKS, Sample, generate, score

LENGTH = 2048
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLE = re.compile(r"One of the special magic \w+ for (.+?) is: (\S+)\.")
PROSE = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from streamkv.lab.models.embedded import converted_dir

    return AutoTokenizer.from_pretrained(converted_dir())


@pytest.fixture(scope="module")
def prose() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics.values())[:60_000]  # about 15k tokens: enough for these lengths, quick to tokenize


@pytest.fixture(scope="module")
def made(tokenizer, prose) -> dict[str, list[Sample]]:
    return {task: generate(task, tokenizer, LENGTH, DEPTHS, 1, seed=0, haystack=prose) for task in TASKS}


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_task_names():
    assert TASKS == ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                     "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")  # fmt: skip


@pytest.mark.parametrize("task", TASKS)
def test_every_task_fits_2048_tokens(task, made, tokenizer):
    samples = made[task]
    needles = task.startswith("niah")
    assert [s.depth for s in samples] == (list(DEPTHS) if needles else [None])
    for s in samples:
        size = count(tokenizer, s.context) + count(tokenizer, s.question)
        assert 0.95 * LENGTH <= size <= LENGTH, size
        assert count(tokenizer, s.context + s.question) <= LENGTH
        assert (s.task, s.length, s.metric, s.seed) == (task, LENGTH, "all", 0)
        assert s.context.endswith("\n") and s.references
        json.dumps(dataclasses.asdict(s))
        expected = {"vt": (30, "Question: Find all variables"), "cwe": (120, "Question: What are the 10 most common"),
                    "fwe": (50, "Question: Do not provide any explanation.")}.get(task, (128, "What "))  # fmt: skip
        assert s.max_new_tokens == expected[0] and s.question.startswith(expected[1])


@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah")])
def test_needles_once_each_and_the_first_at_its_depth(task, made, tokenizer):
    for s in made[task]:
        found = {value: key for key, value in NEEDLE.findall(s.context)}
        for ref in s.references:
            assert s.context.count(ref) == 1, ref
            assert found[ref] in s.question  # the question asks for the key of every answer
        first = next(m.group(0) for m in NEEDLE.finditer(s.context) if m.group(2) == s.references[0])
        hay = s.context.split("\n", 1)[1][:-1]  # without the instruction line and the final newline
        if task in PROSE:  # ± one sentence: no more than one sentence end between the needle and its depth
            for m in NEEDLE.finditer(hay):
                if m.group(0) != first:
                    hay = hay.replace(m.group(0), "").replace("  ", " ").strip()
            at = hay.index(first)
            before, after = hay[:at].strip(), hay[at + len(first) :].strip()
            text = f"{before} {after}".strip()
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            t = round(s.depth * len(offsets))
            target = offsets[t][0] if t < len(offsets) else len(text)
            between = text[min(len(before), target) : max(len(before), target)]
            assert len(re.findall(r"[.!?][\"')\]]* \S", between)) <= 1, (s.depth, between)
        else:  # line haystacks: ± one line
            lines = hay.split("\n")
            at = lines.index(first)
            assert abs(at - s.depth * (len(lines) - 1)) <= 1, (at, s.depth, len(lines))


def test_haystacks_follow_ruler(made):
    assert made["niah_single_1"][0].context.count("The grass is green.") > 50
    for task in ("niah_multikey_2", "niah_multikey_3"):  # a haystack of distractor needles, one line each
        lines = made[task][0].context.split("\n")[1:-1]
        assert len(lines) > 10 and all(NEEDLE.fullmatch(line) for line in lines)
    assert len(NEEDLE.findall(made["niah_multikey_1"][0].context)) == 4
    s = made["niah_single_1"][0]
    assert s.context.startswith("A special magic number is hidden within the following text.")
    assert s.question.endswith("mentioned in the provided text is")
    s = made["niah_multivalue"][0]
    assert s.context.startswith("Some special magic numbers are hidden") and len(s.references) == 4
    assert s.question.endswith("mentioned in the provided text are")
    assert ", and " in made["niah_multiquery"][0].question and len(made["niah_multiquery"][0].references) == 4
    assert re.fullmatch(r"[0-9a-f-]{36}", made["niah_single_3"][0].references[0])


def test_vt_cwe_fwe_answers(made):
    vt = made["vt"][0]
    names = vt.references
    value = re.search(r"assigned the value (\d+)", vt.question).group(1)
    assert len(names) == 5 and f"VAR {names[0]} = {value}" in vt.context
    for a, b in itertools.pairwise(names):
        assert f"VAR {b} = VAR {a} " in vt.context
    assert vt.question.endswith("5 variables are assigned the value " + value + ", they are: ")
    cwe = made["cwe"][0]
    listed = re.findall(r"\d+\. (\S[^.]*?)(?= \d+\. |\n)", cwe.context.rsplit("most often.\n", 1)[1])
    top = sorted(set(listed), key=listed.count, reverse=True)
    assert len(cwe.references) == 10 and set(top[:10]) == set(cwe.references)
    assert min(map(listed.count, cwe.references)) == 6 and listed.count(top[10]) == 1  # RULER below 4096: 6/1
    fwe = made["fwe"][0]
    coded = fwe.context.split("coded words. ", 1)[1].split()
    ranked = sorted(set(coded), key=coded.count, reverse=True)
    assert ranked[0] == "..." and set(ranked[1:4]) == set(fwe.references)
    assert coded.count(ranked[3]) > coded.count(ranked[4])


def test_same_seed_same_prompts_other_seed_others(tokenizer, prose):
    for task in ("niah_single_1", "niah_single_2", "niah_multikey_3", "vt", "cwe", "fwe"):
        one = generate(task, tokenizer, 1024, [0.0, 1.0], 2, seed=3, haystack=prose)
        assert one == generate(task, tokenizer, 1024, [0.0, 1.0], 2, seed=3, haystack=prose)
        other = generate(task, tokenizer, 1024, [0.0, 1.0], 2, seed=4, haystack=prose)
        assert [s.references for s in one] != [s.references for s in other]
        assert [s.context for s in one] != [s.context for s in other]
        assert len({tuple(s.references) for s in one}) == len(one)  # every prompt has answers of its own
    # ordered sample by sample; a depth's prompts do not depend on the other depths asked for
    both = generate("niah_single_1", tokenizer, 1024, [0.0, 1.0], 2, seed=3)
    assert [s.depth for s in both] == [0.0, 1.0, 0.0, 1.0]
    assert generate("niah_single_1", tokenizer, 1024, [1.0], 2, seed=3) == both[1::2]


def test_score_is_rulers_string_match():
    refs = ["1234567", "7654321"]
    assert score("The numbers are 1234567 and 7654321.", refs, "all") == 1.0
    assert score("The numbers are 1234567.", refs, "all") == 0.5
    assert score("nothing", refs, "all") == 0.0
    assert score("The numbers are 1234567.", refs, "part") == 1.0
    assert score("nothing", refs, "part") == 0.0
    assert score("  FANCY-Lamp\x00 ", ["fancy-lamp"], "all") == 1.0  # case-insensitive, control chars ignored
    assert score("ABCDE FGHIJ", ["abcde", "fghij", "klmno"], "all") == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "niah_single_9"}, "task='niah_single_9' is not a RULER task; choose one of ['niah_single_1'"),
        ({"depths": [0.5, 1.5]}, "depth=1.5 is outside [0, 1]"),
        ({"depths": [-0.1]}, "depth=-0.1 is outside [0, 1]"),
        ({"depths": []}, "depths=[] is empty; niah_single_1 needs at least one depth in [0, 1]"),
        ({"length": 60}, "length=60 is too small for niah_single_1: its shortest prompt takes"),
        ({"task": "vt", "length": 400}, "length=400 is too small for vt: its shortest prompt takes"),
        ({"length": 0}, "length=0 is not allowed; give a positive whole number of tokens"),
        ({"samples": 0}, "samples=0 is not allowed"),
        ({"task": "niah_single_2"}, "niah_single_2 hides its needles in prose: pass haystack=<a long text>"),
        (
            {"task": "niah_multikey_1", "haystack": "Too short. "},
            "the haystack has 3 tokens; niah_multikey_1 at length=512 needs a prose text of at least 512 tokens",
        ),
    ],
)
def test_bad_input_is_one_line(tokenizer, kwargs, message):
    args = {"task": "niah_single_1", "tokenizer": tokenizer, "length": 512, "depths": [0.5], "samples": 1} | kwargs
    with pytest.raises(ConfigError) as error:
        generate(**args)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_bad_metric_and_missing_wonderwords(monkeypatch):
    with pytest.raises(ConfigError, match=r"metric='exact' is not a RULER metric; choose one of \['all', 'part'\]"):
        score("x", ["x"], "exact")
    from streamkv.lab.longctx import vocab

    def missing(name):
        raise ModuleNotFoundError("No module named 'wonderwords'")

    monkeypatch.setattr(vocab.resources, "files", missing)
    with pytest.raises(ConfigError, match="pip install wonderwords") as error:
        vocab.wordlist.__wrapped__("noun")
    assert "\n" not in str(error.value)


def test_cwe_longer_than_its_words_is_refused(tokenizer, monkeypatch):
    from streamkv.lab.longctx import aggregation

    monkeypatch.setattr(aggregation, "common_words", lambda: tuple(f"word{i}" for i in range(60)))
    with pytest.raises(
        ConfigError, match=r"^length=4096 is too long for cwe: its 20 distinct words fill only \d+ tokens$"
    ):
        generate("cwe", tokenizer, 4096, [], 1)
