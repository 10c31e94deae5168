"""TurboQuant's key codec (vLLM's MSE keys): each token's whole head vector, normalised to unit length,
Hadamard-rotated, every coordinate the index of its nearest Lloyd-Max level, plus one fp16 number.

Stored as a :class:`~streamkv.kv.storage.codebook.LloydMaxQuantized` block with per-token groups
spanning the head (``group_size = dim``), wrapped in :class:`~streamkv.kv.storage.rotated.Rotated`, so
every reader of the engine reads it (the dense reference, the fused backend, the compiled CPU kernel,
Triton). vLLM's centroids are the Lloyd-Max levels of N(0, 1/d), the distribution of one coordinate of
a rotated unit vector; here the codes index the levels of N(0, 1) (:func:`~streamkv.kv.storage.levels.lloyd_max`)
and the 1/sqrt(d) goes into the block's scale. Reading back (vLLM's ``_tq_full_dequant_kv``):

* without norm correction: ``k = ||k|| * c_d[codes] @ H`` = ``(||k|| / sqrt(d)) * c[codes] @ H``;
* with norm correction: the centroid vector is re-normalised to unit length before it is scaled,
  ``k = ||k|| * c[codes] / ||c[codes]|| @ H``, so the read-back vector has the original L2 norm.

vLLM stores ``||k||`` in fp16 and divides by ``||c[codes]||`` at read time; the codes are known when the
block is written, so here the product ``||k|| / ||c[codes]||`` (or ``||k|| / sqrt(d)``) is the fp16
scale: the same 2 bytes per token and head, the same numbers up to where fp16 rounds.
"""

from __future__ import annotations

import torch

from ..transforms.hadamard import hadamard_on
from .codebook import LloydMaxQuantized, encode_scale
from .levels import lloyd_max, thresholds
from .packing import pack
from .rotated import Rotated

EPS = 1e-8  # vLLM: x / (||x|| + 1e-8)


def quantize_unit_norm(
    x: torch.Tensor, bits: int, norm_correction: bool = True, exclude: torch.Tensor | None = None
) -> Rotated:
    """TurboQuant MSE keys: ``x`` (rows, tokens, dim) per token at ``bits`` (see the module docstring).

    ``exclude`` marks values stored elsewhere (sinks, sparse outliers): they are zeroed first, their
    stored copy replaces the reading."""
    dim = x.shape[-1]
    x = x.float()
    if exclude is not None:
        x = x.masked_fill(exclude, 0.0)
    norm = x.norm(dim=-1, keepdim=True)
    y = (x / (norm + EPS)) @ hadamard_on(dim, x.device, x.dtype) * dim**0.5  # unit-variance coordinates
    codes = torch.bucketize(y, thresholds(bits).to(y.device), right=True)  # vLLM: count of midpoints <= y
    if norm_correction:
        c = lloyd_max(bits).to(y.device)[codes]
        scale = norm / c.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    else:
        scale = norm / dim**0.5
    rows, tokens, _ = x.shape
    stored = encode_scale(scale, "fp16").view(rows, tokens, 1, 1)
    zero = torch.zeros(0, dtype=torch.float16, device=x.device)
    block = LloydMaxQuantized(pack(codes.to(torch.uint8), bits), stored, zero, bits, "token", dim, dim)
    return Rotated(block)
