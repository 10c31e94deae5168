"""Hadamard rotation of the head dimension before quantization (QuaRot-style incoherence).

An orthonormal Hadamard matrix H spreads each value over all channels of its token, so a few large
channels no longer set the range of a per-token group, and low-bit groups see near-Gaussian values.
Attention is unchanged because H is orthogonal: the history is rotated back (``x H^T``) when read.
H is a constant of the head dimension, regenerated on demand, not stored per cache.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@lru_cache(maxsize=None)
def hadamard(dim: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of size ``dim`` (a power of two), float32."""
    if not is_power_of_two(dim):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {dim}")
    h = torch.ones(1, 1)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / dim**0.5


@lru_cache(maxsize=None)
def hadamard_on(dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`hadamard` resident on ``device`` in ``dtype``: no host-to-device copy per forward."""
    return hadamard(dim).to(device, dtype)


def rotate(x: torch.Tensor) -> torch.Tensor:
    return x @ hadamard_on(x.shape[-1], x.device, x.dtype)
