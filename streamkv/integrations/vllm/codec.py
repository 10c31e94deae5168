"""The page slot codec: one fixed-size uint8 slot per (token, KV head) holding packed keys and values.

This is the plugin's only module that imports the streamkv engine (min-max quantization, bit packing,
the Hadamard matrix), so a move of those modules is repointed here and nowhere else. A slot is::

    [key codes | key fp16 (scale, zero) per group | value codes | value fp16 (scale, zero) per group]

Keys and values are rotated by an orthonormal Hadamard matrix H of the head dimension (one loud
channel no longer sets every group's range), then min-max quantized in per-token groups of channels
(the engine's ``axis="token"``), so a token's slot depends on that token alone and is written the
moment vLLM stores it. The read path keeps them rotated: ``(qH)·(kH) = q·k`` and the attention output
of rotated values is the output times H, so a forward rotates its queries and un-rotates its output
once instead of rotating back every history token (:meth:`SlotCodec.dequantize_into`).

A page (one KV head's ``block`` slots in vLLM's ``(pages, heads, block, slot_bytes)`` uint8 tensor)
holds its slots word-major: 32-bit word ``w`` of token ``t`` is word ``w * block + t`` of the page, so
one word of every token of a page is one contiguous row. Why: the compiled decode and read take a page
row by row, every loop running along its tokens; token-major pages had to be transposed first.
:func:`by_token` is the page set seen slot by slot, for code that handles whole slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from streamkv.kv.errors import ConfigError
from streamkv.kv.storage.packed import MIN_SCALE, quantize
from streamkv.kv.storage.packing import packed_size, unpack
from streamkv.kv.transforms.hadamard import hadamard

BITS = (2, 3, 4, 8)
WORD = 4  # bytes: the unit of a page's word-major order (every slot size is a multiple of it)
__all__ = ["BITS", "MIN_SCALE", "WORD", "ConfigError", "SlotCodec", "by_token", "check_pages", "layout"]


@dataclass(frozen=True)
class SlotCodec:
    """Encodes ``(tokens, heads, head_dim)`` keys and values into ``(tokens, heads, slot_bytes)`` uint8."""

    head_dim: int
    key_bits: int
    value_bits: int
    key_group: int = 32
    value_group: int = 32

    def __post_init__(self):
        for name, bits in (("key_bits", self.key_bits), ("value_bits", self.value_bits)):
            if bits not in BITS:
                raise ConfigError(f"{name}={bits} is not allowed; choose one of {list(BITS)}")
        d, g = self.head_dim, max(self.key_group, self.value_group)
        if d < g or d & (d - 1) or d % g:
            raise ConfigError(
                f"streamkv's vLLM backend needs a power-of-two head size that is a multiple of {g} "
                f"(Hadamard rotation, {g}-channel groups); this model has head_size={d}"
            )
        for name, n in (("keys", self.key_bytes), ("values", self.slot_bytes - self.key_bytes)):
            if n % WORD:  # only 3-bit codes of 16 channels
                raise ConfigError(f"head_size={d} packs its {name} into {n} bytes, not whole {WORD}-byte words; "
                                  f"choose other bits or a head size of 32 or more")

    def code_bytes(self, bits: int) -> int:
        """Bytes of one token's packed codes in one head."""
        return packed_size(self.head_dim, bits)

    def part_bytes(self, bits: int, group: int) -> int:
        """Bytes of one token's keys (or values) in one head: packed codes + fp16 scale and zero per group."""
        return self.code_bytes(bits) + 4 * (self.head_dim // group)

    @property
    def key_bytes(self) -> int:
        return self.part_bytes(self.key_bits, self.key_group)

    @property
    def slot_bytes(self) -> int:
        return self.key_bytes + self.part_bytes(self.value_bits, self.value_group)

    @cached_property
    def h(self) -> torch.Tensor:
        return hadamard(self.head_dim).float()

    def rotate(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x H`` (float32 math), as ``dtype`` (default float32)."""
        return (x.float() @ self.h).to(dtype or torch.float32)

    def unrotate(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x Hᵀ``: back from the rotated domain."""
        return (x.float() @ self.h.T).to(dtype or torch.float32)

    def _encode_part(self, rows: torch.Tensor, bits: int, group: int) -> torch.Tensor:
        q = quantize(rows[None], bits, "token", group)
        meta = torch.cat([q.scale, q.zero], -1).reshape(1, rows.shape[0], -1)  # (scale, zero) per group
        return torch.cat([q.codes, meta.view(torch.uint8)], -1)[0]

    def encode(self, key: torch.Tensor, value: torch.Tensor, rotated: bool = False) -> torch.Tensor:
        """Slots of ``key``/``value`` (``(tokens, heads, head_dim)``, any float dtype; already ``x H`` if
        ``rotated``)."""
        t, h, d = key.shape
        k, v = key.reshape(-1, d), value.reshape(-1, d)
        if not rotated:
            k, v = self.rotate(k), self.rotate(v)
        parts = self._encode_part(k, self.key_bits, self.key_group), self._encode_part(v, self.value_bits, self.value_group)
        return torch.cat(parts, -1).view(t, h, self.slot_bytes)

    def _dequantize_part(self, raw: torch.Tensor, bits: int, group: int, out: torch.Tensor) -> None:
        lead, nc, g = raw.shape[:-1], packed_size(self.head_dim, bits), self.head_dim // group
        codes = unpack(raw[..., :nc], bits, self.head_dim).view(*lead, g, group)
        meta = raw[..., nc:].contiguous().view(torch.float16).view(*lead, g, 2).float()
        torch.addcmul(meta[..., 1:], codes, meta[..., :1], out=out.view(*lead, g, group))  # zero + code * scale

    def dequantize_into(self, slots: torch.Tensor, key_out: torch.Tensor, value_out: torch.Tensor) -> None:
        """Rotated keys and values (``x H``) of ``slots`` ``(..., slot_bytes)`` written into ``key_out`` and
        ``value_out`` (``(..., head_dim)``, contiguous, any float dtype): one rounding, no matmul."""
        kb = self.key_bytes
        self._dequantize_part(slots[..., :kb], self.key_bits, self.key_group, key_out)
        self._dequantize_part(slots[..., kb:], self.value_bits, self.value_group, value_out)

    def decode(self, slots: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(..., head_dim)`` of ``slots``, rotated back, as ``dtype`` (the reference read)."""
        k = torch.empty(*slots.shape[:-1], self.head_dim)
        v = torch.empty_like(k)
        self.dequantize_into(slots, k, v)
        return self.unrotate(k, dtype), self.unrotate(v, dtype)


def layout(head_dim: int, key_bits: int, value_bits: int) -> SlotCodec:
    """The slot layout the presets use: low-bit keys in 16-channel groups, 8-bit keys in 32, values in 64.

    Keys carry most of the error (post-RoPE, per token), so they get the finer groups; values tolerate
    one group per head. The comparison that chose this is in docs/serving.md.
    """
    return SlotCodec(head_dim, key_bits, value_bits, 32 if key_bits == 8 else 16, min(64, head_dim))


def check_pages(pages: torch.Tensor) -> None:
    """Raise unless each (page, head) of ``pages`` (``(pages, heads, block, slot_bytes)``) is one contiguous
    run of whole ``WORD``-byte words, which the word-major order needs."""
    size = pages.shape[3]
    if pages.stride()[2:] != (size, 1) or size % WORD:
        raise ValueError(f"a page set with whole contiguous pages of {WORD}-byte words expected; got shape "
                         f"{tuple(pages.shape)}, strides {pages.stride()}")


def by_token(pages: torch.Tensor) -> torch.Tensor:
    """vLLM's page set ``(pages, heads, block, slot_bytes)`` (uint8, word-major pages, see the module
    docstring) as a view indexed by token: ``(pages, heads, block, slot_bytes // WORD, WORD)``, whose
    ``[page, head, t]`` is token ``t``'s slot (its last two dims flattened: :meth:`SlotCodec.encode`'s
    bytes)."""
    check_pages(pages)
    n, heads, block, size = pages.shape
    st = pages.stride()
    return pages.as_strided((n, heads, block, size // WORD, WORD), (st[0], st[1], WORD, WORD * block, 1),
                            pages.storage_offset())
