"""The data layout the compiled CPU kernels read, importable without numba.

Tokens are read in tiles of :data:`TILE`. Packed codes are unpacked in *word layout*: position
``k * words + i`` holds channel ``i * PER + k`` (PER codes per packing word), which makes unpacking
branch-free; queries, RoPE tables and outlier channels are permuted into it instead of the codes.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..storage.packing import codes_per_word

TILE = 64  # tokens per tile: the vector length of every inner loop (64 lets LLVM use full-width SIMD)


@lru_cache(maxsize=None)
def word_order(bits: int, dim: int) -> np.ndarray:
    """``order[m]`` = the channel at word-layout position ``m`` (so ``x[..., order]`` is in word layout)."""
    per = codes_per_word(bits)
    words = dim // per
    m = np.arange(dim, dtype=np.int64)
    return (m % words) * per + m // words
