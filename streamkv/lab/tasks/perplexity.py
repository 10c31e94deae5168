"""Streaming perplexity: the project's headline measurement."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from ...kv.compression import Compression
from ...kv.errors import check, one_of
from ...kv.model_facts import facts_of, max_positions
from ..context import RunContext, new_cache
from ..registry import register
from ..streaming import compare_logprobs, token_logprobs, windows

MODES = ("stream", "full")


@register("task", "perplexity")
@dataclass
class Perplexity:
    """Perplexity over non-overlapping windows of ``window`` tokens.

    ``mode=stream`` feeds each window in ``chunk_size`` chunks through the compressed cache (the
    headline protocol). ``mode=full`` runs each window in one forward pass; with compression on, every
    key and value of the window goes through quantize-dequantize inside that pass (KVQuant's
    simulated protocol, for comparison with published tables).

    ``kl=true`` also measures how far the compressed model's next-token distributions are from the
    uncompressed model's on the same windows and chunks: each window also runs through an uncompressed
    cache, in lockstep (one chunk of reference logits held at a time), and the run reports the mean
    KL(P_uncompressed || P_compressed) per scored token (``kl``, nats), its 99th percentile
    (``kl_p99``) and the fraction of tokens whose argmax agrees (``top1_agreement``). Without
    compression the run is its own reference (KL 0, agreement 1) and no second pass is made.
    ``kl=false`` skips the reference pass (about half the cost of a compressed pass).
    """

    window: int = 2048
    max_windows: Optional[int] = 8
    mode: str = "stream"
    kl: bool = True
    kl_cache_mb: int = 0  # keep the reference's log-probs of up to this many MiB for later runs of this task object

    def __post_init__(self) -> None:
        check(self.window >= 2, f"task.window={self.window} must be >= 2")
        check(self.max_windows is None or self.max_windows >= 1, f"task.max_windows={self.max_windows} must be >= 1")
        one_of("task.mode", self.mode, MODES)

    def precheck(self, positions: int | None, text: str) -> int:
        """Before the weights load: the window fits the model, and the text may hold one window (a token
        is at least one UTF-8 byte, plus perhaps a leading space token). Returns the longest sequence."""
        check(positions is None or self.window <= positions, f"task.window={self.window} exceeds the model's {positions} positions")
        size = len(text.encode())
        check(size + 1 >= self.window, f"the text has {size} bytes, shorter than one window (task.window={self.window} tokens)")
        return self.window

    def run(self, ctx: RunContext) -> dict:
        text = ctx.load_text()
        self.precheck(max_positions(ctx.model), text)
        ids = torch.tensor(ctx.tokenizer(text, add_special_tokens=False)["input_ids"])
        check(
            len(ids) >= self.window,
            f"the text has {len(ids)} tokens, shorter than one window (task.window={self.window})",
        )
        chunk = ctx.chunk_size if self.mode == "stream" else self.window
        facts = facts_of(ctx.model)
        bos = facts.bos_token_id if facts.wants_bos else None  # a family trained with BOS first (Gemma): each
        wins = list(windows(ids, self.window - (bos is not None), self.max_windows))  # window starts with it, as
        if bos is not None:  # lm-eval's HFLM does, and every text token is scored
            wins = [torch.cat([torch.tensor([bos]), w]) for w in wins]
        nll, count, seconds = 0.0, 0, 0.0
        kls, top1 = [], []
        for w in tqdm(wins, desc=f"perplexity ({self.mode})", unit="window", disable=not ctx.progress):
            if self.mode == "full" and not ctx.compression.enabled:
                cache = None
            else:
                cache = ctx.new_cache(quantize_own_chunk=self.mode == "full", chunk_size=chunk)
            chunks = chunk if cache is not None else [len(w)]
            t0 = time.perf_counter()
            if self.kl and ctx.compression.enabled:
                key = (self.mode, chunk, len(w), hash(tuple(w.tolist())))
                stored = self._kept().get(key)
                keep = stored is None and self._room(w, ctx)
                reference = None if stored is not None else self._reference_cache(ctx, chunk)
                res = compare_logprobs(ctx.model, w, cache, reference, chunks, chunks if reference is not None else [len(w)],
                                       reference_logprobs=stored, keep_reference=keep)
                if keep:
                    self._kept()[key] = res["reference"]
                lp = res["logprobs"]
                kls.append(res["kl"])
                top1.append(res["top1"])
                seconds += res["seconds"]  # the compressed forwards only
            else:
                lp, _ = token_logprobs(ctx.model, w, cache, chunks)
                seconds += time.perf_counter() - t0
                if self.kl:  # uncompressed: the run is its own reference
                    kls.append(torch.zeros_like(lp))
                    top1.append(torch.ones_like(lp, dtype=torch.bool))
            nll -= lp.sum().item()
            count += lp.numel()
        metrics = {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(wins)}
        if self.kl:
            kl = torch.cat(kls).double()
            metrics.update(
                kl=kl.mean().item(),
                kl_p99=torch.quantile(kl, 0.99).item(),
                top1_agreement=torch.cat(top1).double().mean().item(),
            )
        result = {
            "metrics": metrics,
            "protocol": {"bos": bos is not None},
            "speed": {"seconds": seconds, "prefill_tokens_per_s": len(wins) * self.window / seconds},
        }
        stats = ctx.compression_stats()
        if stats is not None:
            result["compression"] = stats
        return result

    def _kept(self) -> dict:
        if "_references" not in self.__dict__:
            self.__dict__["_references"] = {}
        return self.__dict__["_references"]

    def _room(self, w: torch.Tensor, ctx: RunContext) -> bool:
        """Whether one more window of reference log-probs fits in ``kl_cache_mb``."""
        vocab = ctx.model.get_output_embeddings().weight.shape[0]
        per_window = (len(w) - 1) * vocab * 4
        return (len(self._kept()) + 1) * per_window <= self.kl_cache_mb * 2**20

    def _reference_cache(self, ctx: RunContext, chunk: int):
        """An uncompressed cache for the reference pass (``None`` in ``mode=full``: one plain forward)."""
        if self.mode == "full":
            return None
        return new_cache(ctx.model, Compression(), chunk)
