"""Bit-packing of unsigned integer codes into uint8 storage.

Codes of ``bits`` in {1, 2, 4, 8} share bytes directly (8 // bits codes per byte). Three-bit codes go
eight to a 24-bit word, stored as three bytes. Packing works on the last axis; every other axis is
kept, so a packed tensor can still be appended to along the token axis. All paths are vectorised.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 8)


def packed_size(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits (the last axis is padded to whole words)."""
    per_word = 8  # codes per packing word: one byte holds 8 // bits, a 3-bit word holds 8 codes in 3 bytes
    if bits == 3:
        return -(-n // per_word) * 3
    return -(-n * bits // 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (uint8, each < 2**bits) along the last axis into uint8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} cannot be packed; supported: {SUPPORTED_BITS}")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    n = codes.shape[-1]
    per = 8 if bits == 3 else 8 // bits
    pad = (-n) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    if bits == 3:
        words = codes.to(torch.int32).unflatten(-1, (-1, 8))
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=codes.device)
        word = (words << shifts).sum(-1, dtype=torch.int32)
        out = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], dim=-1)
        return out.flatten(-2).to(torch.uint8)
    groups = codes.to(torch.uint8).unflatten(-1, (-1, per))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (groups << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes of the last axis, as uint8."""
    if bits == 8:
        return packed[..., :n]
    if bits == 3:
        b = packed.to(torch.int32).unflatten(-1, (-1, 3))
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=packed.device)
        codes = ((word.unsqueeze(-1) >> shifts) & 0x7).to(torch.uint8)
        return codes.flatten(-2)[..., :n]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.flatten(-2)[..., :n]
