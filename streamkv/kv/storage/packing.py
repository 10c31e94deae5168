"""Bit-packing of unsigned integer codes into uint8 storage.

The packable widths are declared here once (:data:`WIDTHS`); every component names the subset it
serves. Codes of ``bits`` in {1, 2, 4, 8} share bytes directly (8 // bits codes per byte). Three-bit
codes go eight to a 24-bit word, stored as three bytes. Packing works on the last axis; every other axis is
kept, so a packed tensor can still be appended to along the token axis. All paths are vectorised.
"""

from __future__ import annotations

import sys

import torch

WIDTHS = (1, 2, 3, 4, 8)  # the widths codes can be packed at
RAW_BITS = 16  # not packed: kept as fp16 (:class:`~streamkv.kv.storage.raw.Raw`)


def packed_size(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits (the last axis is padded to whole words)."""
    per_word = 8  # codes per packing word: one byte holds 8 // bits, a 3-bit word holds 8 codes in 3 bytes
    if bits == 3:
        return -(-n // per_word) * 3
    return -(-n * bits // 8)


def codes_per_word(bits: int) -> int:
    """Codes per packing word: a byte holds 8 // bits, a 3-bit word (3 bytes) holds 8."""
    return 8 if bits == 3 else 8 // bits


def _padded_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` as contiguous uint8, the last axis padded to whole packing words (8 // bits codes a
    byte, 8 codes a 3-bit word)."""
    if bits not in WIDTHS:
        raise ValueError(f"bits={bits} cannot be packed; supported: {WIDTHS}")
    per = codes_per_word(bits)
    pad = (-codes.shape[-1]) % per
    codes = codes.to(torch.uint8)
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    return codes.contiguous()


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` (uint8, each < 2**bits) along the last axis into uint8.

    The inverse of :func:`unpack`'s trick: the codes of one output byte (or 3-byte word) are viewed as
    one wider little-endian integer, one code per byte, and gathered into place with a few contiguous
    shift-and-mask steps.
    """
    codes = _padded_codes(codes, bits)
    if bits == 8:
        return codes
    if codes.storage_offset() % 8:  # the wide view needs an aligned start
        codes = codes.clone()
    if bits == 4:
        w = codes.view(torch.int16)
        return ((w & 0x0F) | ((w >> 4) & 0xF0)).to(torch.uint8)
    if bits == 2:
        w = codes.view(torch.int32)
        return ((w & 0x03) | ((w >> 6) & 0x0C) | ((w >> 12) & 0x30) | ((w >> 18) & 0xC0)).to(torch.uint8)
    w = codes.view(torch.int64)
    if bits == 1:
        w = (w | (w >> 7)) & 0x0003000300030003
        w = (w | (w >> 14)) & 0x0000000F0000000F
        return ((w | (w >> 28)) & 0xFF).to(torch.uint8)
    # 3 bits: eight codes into the low 24 bits, then its three bytes
    w = (w | (w >> 5)) & 0x003F003F003F003F
    w = (w | (w >> 10)) & 0x00000FFF00000FFF
    w = (w | (w >> 20)) & 0x0000000000FFFFFF
    return w.view(torch.uint8).unflatten(-1, (-1, 8))[..., :3].flatten(-2).contiguous()


def _pack_shifts(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The plain per-code shift version of :func:`pack` (any byte order; slower)."""
    codes = _padded_codes(codes, bits)
    if bits == 8:
        return codes
    if bits == 3:
        words = codes.to(torch.int32).unflatten(-1, (-1, 8))
        shifts = torch.arange(0, 24, 3, dtype=torch.int32, device=codes.device)
        word = (words << shifts).sum(-1, dtype=torch.int32)
        out = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], dim=-1)
        return out.flatten(-2).to(torch.uint8)
    groups = codes.unflatten(-1, (-1, 8 // bits))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (groups << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``n`` codes of the last axis, as uint8.

    The codes of a byte (or of a 3-byte word) are spread into one byte each inside a wider integer
    and the result is viewed back as bytes (little-endian), so every step is a contiguous elementwise
    op: no per-code strided writes, which dominate the read path of the cache otherwise.
    """
    if bits == 8:
        return packed[..., :n]
    if bits not in WIDTHS:
        raise ValueError(f"bits={bits} cannot be unpacked; supported: {WIDTHS}")
    if bits == 4:
        x = packed.to(torch.int16).contiguous()
        codes = ((x | (x << 4)) & 0x0F0F).view(torch.uint8)
    elif bits == 2:
        x = packed.to(torch.int32).contiguous()
        codes = ((x | (x << 6) | (x << 12) | (x << 18)) & 0x03030303).view(torch.uint8)
    elif bits == 1:
        x = packed.to(torch.int64).contiguous()
        x = (x | (x << 28)) & 0x0000000F0000000F
        x = (x | (x << 14)) & 0x0003000300030003
        codes = ((x | (x << 7)) & 0x0101010101010101).view(torch.uint8)
    else:  # 3 bits: eight codes in a 24-bit word of three bytes
        b = packed.unflatten(-1, (-1, 3))
        w = b[..., 0].to(torch.int64) | (b[..., 1].to(torch.int64) << 8) | (b[..., 2].to(torch.int64) << 16)
        w = (w.contiguous() | (w << 20)) & 0x00000FFF00000FFF  # two 12-bit halves (4 codes each) into 32-bit lanes
        w = (w | (w << 10)) & 0x003F003F003F003F  # 6-bit pairs into 16-bit lanes
        codes = ((w | (w << 5)) & 0x0707070707070707).view(torch.uint8)  # one code per byte
    return codes[..., :n]


def _unpack_shifts(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The plain per-code shift version of :func:`unpack` (any byte order; slower)."""
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


if sys.byteorder != "little":  # pragma: no cover - the byte-view tricks assume little-endian words
    pack, unpack = _pack_shifts, _unpack_shifts  # noqa: F811
