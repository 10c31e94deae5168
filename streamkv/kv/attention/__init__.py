"""Attention backends: how a forward attends on a compressed layer's history.

``dense`` materialises the history (the reference); ``fused`` attends on the compressed segments
with an online softmax (CPU kernels in decoding); ``triton`` runs fused GPU kernels; ``auto`` picks
the fastest that meets the quality target on the model's device (on the CPU: ``fused`` for decoding,
the dense read for prefill chunks).
"""

from .backend import AttentionBackend, AutoBackend
from .dense import DenseBackend
from .fused import FusedBackend
from .split import SplitBackend
from .triton import TritonBackend


def resolve(backend, device) -> AttentionBackend:
    """The concrete backend for ``device`` (``auto`` resolved)."""
    return backend.resolve(device) if isinstance(backend, AutoBackend) else backend


__all__ = ["AttentionBackend", "AutoBackend", "DenseBackend", "FusedBackend", "SplitBackend", "TritonBackend", "resolve"]
