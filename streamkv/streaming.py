"""Streaming chunked prefill: feed tokens through a cache chunk by chunk and score them.

This is the measurement protocol of the project (see ``shared/notes/anchors.md``): chunk *i* attends
to the cache's (compressed) history of chunks < *i* and to its own keys/values; every token after the
first is scored, the first token of chunk *i+1* from the last logit of chunk *i*.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


def chunk_lengths(n: int, chunk_size: int) -> list[int]:
    return [min(chunk_size, n - s) for s in range(0, n, chunk_size)]


@torch.inference_mode()
def token_logprobs(
    model: torch.nn.Module,
    ids: torch.Tensor,
    cache,
    chunks: Sequence[int] | int,
    prev_logits: torch.Tensor | None = None,
    greedy: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Log-probabilities of ``ids`` (1-D) fed through ``cache`` in ``chunks``.

    ``chunks`` is a chunk size or an explicit list of chunk lengths. Returns ``(logprobs, last_logits)``:
    ``logprobs[t]`` is log p(ids[t] | ids[:t] and the cache's earlier content); its first entry is
    scored from ``prev_logits`` if given, else it is left out (``len(ids) - 1`` entries). With
    ``greedy=True`` a third element says, per scored token, whether it was the argmax (lm-eval's is_greedy).
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    lengths = chunk_lengths(len(ids), chunks) if isinstance(chunks, int) else list(chunks)
    out, hits, start = [], [], 0
    for n in lengths:
        chunk = ids[start : start + n]
        logits = model(input_ids=chunk.unsqueeze(0), cache=cache, use_cache=True).logits[0]
        if prev_logits is not None:
            logits_for = torch.cat([prev_logits.unsqueeze(0), logits[:-1]])
            targets = chunk
        else:
            logits_for, targets = logits[:-1], chunk[1:]
        if len(targets):
            logp = torch.log_softmax(logits_for.float(), -1)
            out.append(logp.gather(1, targets.unsqueeze(1)).squeeze(1))
            if greedy:
                hits.append(logp.argmax(-1) == targets)
        prev_logits = logits[-1]
        start += n
    logprobs = torch.cat(out) if out else torch.zeros(0, device=device)
    if greedy:
        return logprobs, prev_logits, torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool, device=device)
    return logprobs, prev_logits


@torch.inference_mode()
def prefill(model: torch.nn.Module, ids: torch.Tensor, cache, chunks: Sequence[int] | int, batch: int = 1) -> torch.Tensor:
    """Feed ``ids`` (1-D; the same prompt ``batch`` times) through ``cache`` in ``chunks`` like
    :func:`token_logprobs`, but compute only the last position's logits (what a serving prefill does);
    returns those of the first sequence. For throughput measurements."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    lengths = chunk_lengths(len(ids), chunks) if isinstance(chunks, int) else list(chunks)
    start, logits = 0, None
    for n in lengths:
        chunk = ids[start : start + n].unsqueeze(0).expand(batch, -1)
        logits = model(input_ids=chunk, cache=cache, use_cache=True, logits_to_keep=1).logits
        start += n
    return logits[0, -1]


def windows(ids: torch.Tensor, window: int, max_windows: int | None) -> Iterable[torch.Tensor]:
    """Non-overlapping windows of ``window`` tokens (a partial last window is dropped)."""
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    for i in range(n):
        yield ids[i * window : (i + 1) * window]
