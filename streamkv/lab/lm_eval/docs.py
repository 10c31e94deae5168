"""Documents for the local lm-eval tasks, cut from the run's text so they work offline on any ``data``.

- :func:`rolling_docs`: consecutive paragraphs grouped into documents of at least ``words`` words
  (wikitext-style pages, scored by ``loglikelihood_rolling``);
- :func:`lastword_docs`: LAMBADA-style passages of about ``words`` words whose target is the passage's
  last word (the last purely alphabetic word of the span, so punctuation never becomes the target).
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\S+")
_TARGET = re.compile(r"[A-Za-z]{2,}")


def rolling_docs(text: str, words: int) -> list[dict]:
    """``{"page": ...}`` documents of whole paragraphs, each at least ``words`` words (the last may be shorter)."""
    docs, current, count = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        current.append(para.strip("\n"))
        count += len(para.split())
        if count >= words:
            docs.append({"page": "\n\n".join(current)})
            current, count = [], 0
    if current:
        docs.append({"page": "\n\n".join(current)})
    return docs


def lastword_docs(text: str, words: int) -> list[dict]:
    """``{"context", "target"}`` passages: non-overlapping spans of ``words`` words, each ending at its
    last alphabetic word, which becomes the target; the context keeps the text's own whitespace."""
    spans = [m.span() for m in _WORD.finditer(text)]
    docs = []
    for start in range(0, len(spans) - words + 1, words):
        span = spans[start : start + words]
        for i in range(len(span) - 1, len(span) // 2, -1):  # the target sits in the passage's second half
            a, b = span[i]
            if _TARGET.fullmatch(text[a:b]):
                docs.append({"context": text[span[0][0] : a].rstrip(), "target": text[a:b]})
                break
    return docs
