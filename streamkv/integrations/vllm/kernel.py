"""The backend's compiled hot loops (numba), launched from here; the kernels live in their own modules.

* The read (``numba_read.py``, :func:`read_pages`): packed pages to bf16 rows in vLLM's page layout in
  a single pass. Why: as torch ops that is a gather, a transpose, an unpack, a scale/shift and a cast,
  each a full pass over the history, and it cost 20x vLLM's attention itself; fused it is one read of
  the packed bytes and one write of bf16 (still in the Hadamard-rotated domain, see ``codec.py``).
* The decode (``numba_decode.py``, :func:`decode`): a sequence whose query is one token attends
  straight from its packed slots, with no bf16 history at all (float32 math; see that module).

Both are imported on first use, after vLLM's workers have started: vLLM 0.32's CPU worker scans every
loaded module at start and dies on llvmlite's library object, whose ``__getattr__`` answers dunder
names; :func:`_guard_llvmlite` makes those raise, so a second engine in the same process starts too.
Each compiles once per machine and layout (~15-60 s; numba's on-disk cache). Without numba the rows
come from torch ops (``codec.dequantize_into``) and one-token queries take the read path too.
"""

from __future__ import annotations

import sys
from functools import cache
from importlib import import_module

import numpy as np
import torch

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


def kernel(codec):
    """The compiled read for ``codec``'s slot layout, or None where numba is not installed."""
    m = _compiled("numba_read")
    return m and m.reader(codec.head_dim, codec.key_group, codec.value_group)


def decoder(codec):
    """The compiled decode attention for ``codec``'s slot layout, or None where numba is not installed."""
    m = _compiled("numba_decode")
    return m and m.decoder(codec.head_dim, codec.key_group, codec.value_group)


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
    f = kernel(codec) if out.dtype == torch.bfloat16 else None
    if f is None:
        return False
    c, block = codec, kv_cache.shape[2]
    k_off, v_off = page_layout(isa, block, c.head_dim)
    f(kv_cache.numpy(), pages.numpy(), out.view(torch.int16).view(-1, block * 2 * c.head_dim).numpy().view(np.uint16),
      k_off, v_off, c.key_bits, c.key_group, c.code_bytes(c.key_bits), c.value_bits, c.value_group,
      c.code_bytes(c.value_bits), c.key_bytes)
    return True


def decode(codec, kv_cache: torch.Tensor, table: torch.Tensor, past: torch.Tensor, q: torch.Tensor,
           k_own: torch.Tensor, v_own: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Attention of one-token queries over their packed history and their own key and value, all in the
    rotated domain: ``q`` (float32 ``(seqs, heads, head_dim)``, rotated), ``k_own``/``v_own`` (float32
    ``(seqs, kv_heads, head_dim)``, rotated), ``table`` (int32 page ids per sequence), ``past`` (int64
    stored tokens per sequence, read from ``kv_cache``'s packed slots). The rotated output (float32, the
    shape of ``q``), or None where numba is missing."""
    f = decoder(codec)
    if f is None:
        return None
    c, out = codec, torch.empty_like(q)
    f(kv_cache.numpy(), table.numpy(), past.numpy(), q.numpy(), k_own.numpy(), v_own.numpy(), out.numpy(),
      float(scale), c.key_bits, c.key_group, c.code_bytes(c.key_bits), c.value_bits, c.value_group,
      c.code_bytes(c.value_bits), c.key_bytes)
    return out
