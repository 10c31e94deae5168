"""Streaming chunked prefill: feed tokens through a cache chunk by chunk and score them.

This is the measurement protocol of the project (see ``docs/results.md``): chunk *i* attends
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
def compare_logprobs(
    model: torch.nn.Module,
    ids: torch.Tensor,
    cache,
    reference,
    chunks: Sequence[int] | int,
    reference_chunks: Sequence[int] | int | None = None,
    reference_logprobs: list[torch.Tensor] | None = None,
    keep_reference: bool = False,
) -> dict[str, torch.Tensor]:
    """Score ``ids`` (1-D) through ``cache`` like :func:`token_logprobs` and compare each scored
    next-token distribution with the one of ``reference`` (e.g. an uncompressed cache; ``None`` = one
    forward without a cache) fed the same tokens in ``reference_chunks`` (default: ``chunks``).

    Both passes advance in lockstep, so only one chunk of logits per pass is held. Returns per scored
    token (the tokens :func:`token_logprobs` scores without ``prev_logits``): ``logprobs`` (of the
    target under ``cache``), ``kl`` = KL(P_reference || P_cache) in nats, and ``top1`` (the two
    argmaxes agree), and ``seconds``: the time of the forwards through ``cache`` alone.
    With identical logits ``kl`` is exactly 0 and ``top1`` all true.

    ``keep_reference=True`` also returns ``reference``: the reference's log-probabilities of the scored
    positions, one tensor per chunk, which a later call over the same ids and chunks takes as
    ``reference_logprobs`` instead of running the reference again (a benchmark compares many caches).
    """
    import time

    device = next(model.parameters()).device
    ids = ids.to(device)
    lengths = chunk_lengths(len(ids), chunks) if isinstance(chunks, int) else list(chunks)
    if reference_chunks is None:
        reference_chunks = lengths
    ref_lengths = chunk_lengths(len(ids), reference_chunks) if isinstance(reference_chunks, int) else list(reference_chunks)
    ref_bounds = [0]
    for n in ref_lengths:
        ref_bounds.append(ref_bounds[-1] + n)
    ref_logits: torch.Tensor | None = None  # the reference's logits from ref_start on
    ref_start, ref_next = 0, 0
    out: dict[str, list[torch.Tensor]] = {"logprobs": [], "kl": [], "top1": [], "reference": []}
    prev, prev_ref, start, seconds, ref_for = None, None, 0, 0.0, None

    def reference_logits(lo: int, hi: int) -> torch.Tensor:
        """The reference's logits at positions [lo, hi), running its forwards as far as needed."""
        nonlocal ref_logits, ref_start, ref_next
        while ref_bounds[ref_next] < hi:
            a, b = ref_bounds[ref_next], ref_bounds[ref_next + 1]
            logits = model(input_ids=ids[a:b].unsqueeze(0), cache=reference, use_cache=reference is not None).logits[0]
            if ref_logits is None or ref_start + ref_logits.shape[0] <= lo:
                ref_logits, ref_start = logits, a
            else:
                keep = ref_logits[lo - ref_start :]
                ref_logits, ref_start = torch.cat([keep, logits]), lo
            ref_next += 1
        return ref_logits[lo - ref_start : hi - ref_start]

    for n in lengths:
        chunk = ids[start : start + n]
        t0 = time.perf_counter()
        logits = model(input_ids=chunk.unsqueeze(0), cache=cache, use_cache=True).logits[0]
        seconds += time.perf_counter() - t0
        i = len(out["logprobs"])
        if reference_logprobs is None:
            ref = reference_logits(start, start + n)
            ref_for = ref[:-1] if prev is None else torch.cat([prev_ref.unsqueeze(0), ref[:-1]])
        if prev is not None:
            logits_for, targets = torch.cat([prev.unsqueeze(0), logits[:-1]]), chunk
        else:
            logits_for, targets = logits[:-1], chunk[1:]
        if len(targets):
            logp = torch.log_softmax(logits_for.float(), -1)
            logq = torch.log_softmax(ref_for.float(), -1) if reference_logprobs is None else reference_logprobs[i]
            if keep_reference:
                out["reference"].append(logq)
            out["logprobs"].append(logp.gather(1, targets.unsqueeze(1)).squeeze(1))
            out["kl"].append((logq.exp() * (logq - logp)).sum(-1).clamp_min_(0.0))
            out["top1"].append(logp.argmax(-1) == logq.argmax(-1))
        prev = logits[-1]
        if reference_logprobs is None:
            prev_ref = ref[-1]
        start += n
    empty = {"logprobs": torch.float32, "kl": torch.float32, "top1": torch.bool}
    res = {k: torch.cat(v) if v else torch.zeros(0, dtype=empty[k], device=device) for k, v in out.items() if k in empty}
    res["seconds"] = seconds
    if keep_reference:
        res["reference"] = out["reference"]
    return res


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
