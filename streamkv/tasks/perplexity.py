"""Streaming perplexity: the project's headline measurement."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..context import RunContext
from ..kv.errors import check, one_of
from ..kv.model_facts import max_positions
from ..registry import register
from ..streaming import token_logprobs, windows

MODES = ("stream", "full")


@register("task", "perplexity")
@dataclass
class Perplexity:
    """Perplexity over non-overlapping windows of ``window`` tokens.

    ``mode=stream`` feeds each window in ``chunk_size`` chunks through the compressed cache (the
    headline protocol). ``mode=full`` runs each window in one forward pass; with compression on, every
    key and value of the window goes through quantize-dequantize inside that pass (KVQuant's
    simulated protocol, for comparison with published tables).
    """

    window: int = 2048
    max_windows: Optional[int] = 8
    mode: str = "stream"

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
        wins = list(windows(ids, self.window, self.max_windows))
        nll, count, seconds = 0.0, 0, 0.0
        for w in tqdm(wins, desc=f"perplexity ({self.mode})", unit="window", disable=not ctx.progress):
            if self.mode == "full" and not ctx.compression.enabled:
                cache = None
            else:
                cache = ctx.new_cache(quantize_own_chunk=self.mode == "full", chunk_size=chunk)
            t0 = time.perf_counter()
            lp, _ = token_logprobs(ctx.model, w, cache, chunk if cache is not None else [len(w)])
            seconds += time.perf_counter() - t0
            nll -= lp.sum().item()
            count += lp.numel()
        result = {
            "metrics": {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(wins)},
            "speed": {"seconds": seconds, "prefill_tokens_per_s": len(wins) * self.window / seconds},
        }
        stats = ctx.compression_stats()
        if stats is not None:
            result["compression"] = stats
        return result
