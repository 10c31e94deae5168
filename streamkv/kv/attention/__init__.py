"""Attention readers: how a forward attends on a compressed layer's history (the read contract:
:mod:`.view`), one module per reader.

``dense`` materialises the history (the reference); ``fused`` attends on the compressed segments
with an online softmax (its compiled CPU kernel's host side: :mod:`.cpu`); ``triton`` runs fused GPU
kernels (host side: :mod:`.triton`); ``auto`` picks the fastest that meets the quality target on the
model's device (:mod:`.auto`). Compiled code lives in :mod:`streamkv.kv.kernels`.
"""

from .auto import AutoBackend, SplitBackend, resolve
from .backend import AttentionBackend
from .dense import DenseBackend
from .fused import FusedBackend
from .triton import TritonBackend

__all__ = ["AttentionBackend", "AutoBackend", "DenseBackend", "FusedBackend", "SplitBackend", "TritonBackend", "resolve"]
