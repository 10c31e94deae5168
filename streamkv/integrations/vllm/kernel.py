"""The backend's compiled hot loops (numba), launched from here; the kernels live in their own modules.

* The store (``numba_encode.py``, :func:`store`): a step's new keys and values rotated, quantized,
  packed and written into their slots in one pass. Why: as torch ops that is a rotation, a min/max, a
  division, a round, a pack and a scatter per layer and step, each with its own overhead.
* The read (``numba_read.py``, :func:`read_pages`): packed pages to bf16 rows in vLLM's page layout in
  a single pass. Why: as torch ops that is a gather, a transpose, an unpack, a scale/shift and a cast,
  each a full pass over the history, and it cost 20x vLLM's attention itself; fused it is one read of
  the packed bytes and one write of bf16 (still in the Hadamard-rotated domain, see ``codec.py``).
* The decode (``numba_decode.py``, :func:`decode`): a sequence whose query is one token attends
  straight from its packed slots, with no bf16 history at all (float32 math; see that module); it
  takes vLLM's rows as they are and writes the output rows in place, rotations included.

All are imported on first use, after vLLM's workers have started: vLLM 0.32's CPU worker scans every
loaded module at start and dies on llvmlite's library object, whose ``__getattr__`` answers dunder
names; :func:`_guard_llvmlite` makes those raise, so a second engine in the same process starts too.
Each is one entry for every slot layout, compiled once per machine (~15-60 s; numba's on-disk cache).
Without numba the slots are written and read by torch ops (``codec.encode``, ``codec.dequantize_into``)
and one-token queries take the read path too.
"""

from __future__ import annotations

import sys
from functools import cache
from importlib import import_module

import numpy as np
import torch

from .codec import MIN_SCALE, WORD, check_pages

_NUMBA: dict = {}  # module name -> the compiled module, or None when numba is not installed


def _guard_llvmlite() -> None:
    wrapper = getattr(sys.modules.get("llvmlite.binding.ffi"), "_lib_wrapper", None)
    if wrapper is None or getattr(wrapper, "_streamkv_guarded", False):
        return
    lookup = wrapper.__getattr__

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return lookup(self, name)

    wrapper.__getattr__ = __getattr__
    wrapper._streamkv_guarded = True


def _compiled(name: str):
    if name not in _NUMBA:
        try:
            _NUMBA[name] = import_module(f".{name}", __package__)
        except ImportError:
            _NUMBA[name] = None
        _guard_llvmlite()
    return _NUMBA[name]


def encoder():
    """The compiled store (every layout), or None where numba is not installed."""
    m = _compiled("numba_encode")
    return m and m.store


def decoder():
    """The compiled decode attention (every layout), or None where numba is not installed."""
    m = _compiled("numba_decode")
    return m and m.decode


@cache
def page_layout(isa: str, block: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Where vLLM's ``cpu_attn_reshape_and_cache`` puts key and value element ``(t, c)`` inside one
    (page, head) of a bf16 page set (ISA-specific tiles), as two ``(block, head_dim)`` offset arrays:
    learnt by storing token and channel numbers through that op once."""
    from vllm import _custom_ops as ops

    found = []
    for numbers in (torch.arange(block)[:, None], torch.arange(head_dim)[None, :]):
        page = torch.zeros(1, 1, block, 2 * head_dim, dtype=torch.bfloat16)
        k, v = page.view(1, 1, 2 * block, head_dim).chunk(2, dim=2)
        x = numbers.expand(block, head_dim)[:, None].bfloat16().contiguous()
        ops.cpu_attn_reshape_and_cache(x, x, k, v, torch.arange(block), isa, k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype="auto")
        found.append(page.view(2, block * head_dim).long())
    offsets = []
    for half in (0, 1):
        o = torch.empty(block, head_dim, dtype=torch.int64)
        o[found[0][half], found[1][half]] = torch.arange(block * head_dim) + half * block * head_dim
        offsets.append(o.numpy().astype(np.int32))
    return offsets[0], offsets[1]


def read_pages(codec, kv_cache: torch.Tensor, pages: torch.Tensor, out: torch.Tensor, isa: str) -> bool:
    """Fill ``out`` (bf16 ``(len(pages), heads, block, 2 * head_dim)``, vLLM's page layout for ``isa``)
    with the rotated keys and values of the packed slots of ``kv_cache[pages]``; False (nothing done)
    where numba is missing or ``out`` is not bf16."""
    m = _compiled("numba_read") if out.dtype == torch.bfloat16 else None
    if m is None:
        return False
    c, block = codec, kv_cache.shape[2]
    rows = out.view(torch.int16).view(-1, block * 2 * c.head_dim).numpy().view(np.uint16)
    m.read(*_flat(kv_cache), pages.numpy(), rows, *lane_offsets(isa, block, c), c.key_bits, c.key_group,
           c.value_bits, c.value_group, c.key_bytes // WORD)
    return True


def lanes(bits: int, dim: int) -> np.ndarray:
    """The channel in each lane of ``numba_decode``'s unpacking of ``bits``-bit codes: lane ``kk * words
    + w`` holds code ``kk`` of 32-bit word ``w``, channel ``w * per + kk`` (3 bits: natural order)."""
    per = 32 // bits if bits != 3 else 1
    lane = np.arange(dim)
    return (lane % (dim // per)) * per + lane // (dim // per)


@cache
def lane_offsets(isa: str, block: int, codec) -> tuple[np.ndarray, np.ndarray]:
    """:func:`page_layout`'s offsets as ``(lanes, block)``, in the lane order of ``codec``'s key and value
    codes: where the compiled read puts each lane of its tiles."""
    k_off, v_off = page_layout(isa, block, codec.head_dim)
    return tuple(np.ascontiguousarray(o[:, lanes(bits, codec.head_dim)].T)
                 for o, bits in ((k_off, codec.key_bits), (v_off, codec.value_bits)))


@cache
def rotations(codec) -> tuple[np.ndarray, np.ndarray]:
    """``Hk`` (the Hadamard matrix, columns in the keys' lanes) and ``Hvᵀ`` (rows in the values' lanes),
    float32: the decode rotates queries into the keys' lanes and its output back from the values'."""
    h = codec.h.numpy()
    hk = np.ascontiguousarray(h[:, lanes(codec.key_bits, codec.head_dim)])
    hvt = np.ascontiguousarray(h[:, lanes(codec.value_bits, codec.head_dim)].T)
    return hk, hvt


def _rows(x: torch.Tensor, heads: int) -> np.ndarray | None:
    """``x`` as ``(tokens, heads, head_dim)`` numpy (bf16 as its uint16 bits), or None for other dtypes."""
    x = x.view(x.shape[0], heads, -1)
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy() if x.dtype == torch.float32 else None


def _flat(pages: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The bytes ``pages`` (``(pages, heads, block, slot_bytes)`` uint8, strided as vLLM's, word-major pages:
    see ``codec.py``) spans, as one flat array of 32-bit words, and its geometry in words: page and head
    strides, the page's tokens, a slot's words. Contiguous 32-bit words are what let the compiled store,
    read and decode move a page row by row, and the decode's unpacking vectorize."""
    check_pages(pages)
    span = sum((n - 1) * st for n, st in zip(pages.shape, pages.stride())) + 1
    flat = pages.as_strided((span,), (1,)).numpy().view(np.uint32)
    return flat, np.array([*(st // WORD for st in pages.stride()[:2]), pages.shape[2], pages.shape[3] // WORD])


def store(codec, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> bool:
    """Rotate, quantize and pack ``key``/``value`` (``(tokens, kv_heads, head_dim)``, bf16 or float32, as
    vLLM hands them) straight into the slots ``slots`` (int64, none negative) of ``kv_cache``; False
    (nothing written) where numba is missing or the dtype is neither."""
    f, c, heads = encoder(), codec, kv_cache.shape[1]
    k, v = _rows(key, heads), _rows(value, heads)
    if f is None or k is None or v is None or key.dtype != value.dtype:
        return False
    f(*_flat(kv_cache), slots.numpy(), k, v, c.h.numpy(), c.key_bits, c.key_group, c.value_bits, c.value_group,
      c.key_bytes, MIN_SCALE)
    return True


def decode(codec, kv_cache: torch.Tensor, table: torch.Tensor, past: torch.Tensor, rows: torch.Tensor,
           query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor, scale: float) -> bool:
    """Attention of the one-token queries at step rows ``rows`` (int64) over their packed history and their
    own key and value, written into ``output`` at those rows: ``query``/``output`` ``(tokens, heads *
    head_dim)`` or ``(tokens, heads, head_dim)`` and ``key``/``value`` ``(tokens, kv_heads, head_dim)`` as
    vLLM hands them (un-rotated), ``table`` (int32 page ids per sequence), ``past`` (int64 stored tokens
    per sequence, read from ``kv_cache``'s packed slots). False (nothing written) where numba is missing
    or the dtype is not bf16 or float32."""
    f, c = decoder(), codec
    heads = query[0].numel() // c.head_dim
    arrays = [_rows(x, n) for x, n in ((query, heads), (key, kv_cache.shape[1]), (value, kv_cache.shape[1]),
                                       (output, heads))]
    if f is None or any(a is None for a in arrays) or len({x.dtype for x in (query, key, value, output)}) > 1:
        return False
    hk, hvt = rotations(c)
    f(*_flat(kv_cache), table.numpy(), past.numpy(), rows.numpy(), *arrays, hk, hvt, float(scale),
      c.key_bits, c.key_group, c.value_bits, c.value_group, c.key_bytes // WORD)
    return True
