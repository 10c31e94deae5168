"""Loaders and scorers of the streamkv lm-eval tasks.

Their documents are built from the run's text by ``task=lm_eval`` (``streamkv/tasks/lm_eval.py``) and
written as ``<name>.jsonl`` into the directory given as lm-eval metadata ``streamkv_docs``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets

from streamkv.lab.longctx import score
from streamkv.lab.longctx.passkey import passkey_match


def _load(name: str, kwargs: dict) -> dict:
    root = kwargs.get("streamkv_docs")
    if not root:
        raise ValueError(f"{name} builds its documents at run time: run it with `python -m runners.eval task=lm_eval`")
    with open(Path(root) / f"{name}.jsonl") as f:
        return {"test": datasets.Dataset.from_list([json.loads(line) for line in f])}


def rolling(**kwargs):
    return _load("streamkv_rolling", kwargs)


def lastword(**kwargs):
    return _load("streamkv_lastword", kwargs)


def passkey(**kwargs):
    return _load("streamkv_passkey", kwargs)


def ruler(ruler_task: str, **kwargs):
    return _load(f"streamkv_{ruler_task}", kwargs)


def rolling_results(doc, results):
    """lm-eval's wikitext metrics: perplexity per word and per byte of the document, and bits per byte."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    nbytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }


def passkey_results(doc, results):
    return {"acc": float(passkey_match(results[0], doc["target"]))}


def ruler_results(doc, results):
    """RULER's score of the answer (``string_match_all``: the fraction of references found)."""
    return {"score": score(results[0], doc["references"], doc["metric"])}
