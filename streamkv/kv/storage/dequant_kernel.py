"""Reading a packed block back to numbers, compiled (numba, where it is installed).

Why compiled: a chunk of a compressed prefill reads its whole history back densely for SDPA (see
:mod:`streamkv.kv.attention.auto`), so a prefill reads O(n²/chunk) codes. In torch each block is an
unpack into a byte per code, a gather of the levels, a multiply and an add, each a pass over memory,
and a row-split block adds an ``index_copy_`` per width. Here one parallel pass per (row, unit) reads
the packed bytes and writes the dequantized values straight into the caller's buffer (its rows where a
row-split block says). The numbers are the torch path's (:meth:`Quantized.dequantize`), which stays
the reference and the path without numba, on other devices and for other dtypes.

The loop itself is :mod:`streamkv.kv.kernels.cpu_dequant`. The arrays a kernel reads of a block
(codes, float32 scales and zeros, levels) are made once and held by the block (:func:`arrays`), shared
with the CPU decode kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from ..kernels import compiled_cpu


def available() -> bool:
    return compiled_cpu()


def arrays(block):
    """``block``'s codes, scales and zeros (float32, (rows, units, groups)) and levels as numpy
    arrays, with its unit tokens and group size; made once per block and held by it (a stored block
    never changes)."""
    held = block.derived.get("cpu")
    if held is None:
        shape = (block.codes.shape[0], block.codes.shape[1], -1)
        scale = block.scale_values(torch.float32).reshape(shape).numpy()
        zero = block.zero.reshape(shape).float().numpy() if block.has_zero else np.zeros_like(scale)
        lut = np.zeros(1, np.float32) if block.lut is None else block.lut.float().numpy()
        held = block.derived["cpu"] = (block.codes.numpy(), scale, zero, lut, block.unit_tokens, block.group_size)
    return held


def serves(block, out: torch.Tensor | None = None) -> bool:
    """Whether :func:`dequantize_into` reads ``block`` (into ``out``, float32 on the CPU): a packed
    group block (:class:`~streamkv.kv.storage.packed.Quantized`: codes and a group axis; asked of any
    part of a composite) on the CPU, codes of width 2, 3, 4 or 8, each token's codes on a whole byte."""
    codes = getattr(block, "codes", None)
    return (
        isinstance(codes, torch.Tensor) and getattr(block, "axis", None) in ("channel", "token")
        and codes.device.type == "cpu" and block.bits in (2, 3, 4, 8) and block.dim % 8 == 0 and available()
        and (out is None or (out.device.type == "cpu" and out.dtype == torch.float32))
    )


def dequantize_into(block, out: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """``block`` (a :class:`~streamkv.kv.storage.packed.Quantized`) dequantized into ``out`` (float32,
    (rows, tokens, dim), any strides): its row ``i`` into ``out[rows[i]]`` (``rows`` None: the same row)."""
    codes, scale, zero, lut, unit, group = arrays(block)
    from ..kernels.cpu_dequant import dequantize  # numba: imported where it runs

    index = np.arange(codes.shape[0], dtype=np.int64) if rows is None else rows.to(torch.int64).numpy()
    dequantize(codes, scale, zero, lut, block.bits, block.lut is not None, block.axis == "channel", unit, group, index, out.numpy())
