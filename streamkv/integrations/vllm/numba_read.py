"""The compiled read (numba), imported by ``kernel.py`` on the first read only (never at import time:
vLLM 0.32's CPU worker dies at start if numba is loaded; see ``kernel.py``).

One job per (page, KV head): its keys, then its values, dequantized along the page's tokens into a
float32 (lanes x tokens) tile as the decode does it (``numba_pages.py``), each rounded to bf16 and
placed at its offset in vLLM's page layout (the offsets come per lane, ``kernel.read_pages``). No
fastmath: a dequantized value is ``code * scale + zero`` rounded twice, as torch's read rounds it.
"""

import numba
import numpy as np

from .numba_formats import narrow
from .numba_pages import dequant, page

jit = numba.njit(inline="always", cache=True)


@jit
def place(tile, rounded, region, offsets):  # bf16 of tile[lane, t] at region[offsets[lane, t]]
    for lane in range(tile.shape[0]):
        narrow(tile[lane], rounded)
        at = offsets[lane]
        for t in range(rounded.shape[0]):
            region[at[t]] = rounded[t]


@numba.njit(parallel=True, cache=True)
def read(cache, geo, pages, out, k_offsets, v_offsets, kbits, kgroup, vbits, vgroup, kwords):
    """Every (page, KV head) of ``pages`` into ``out`` (rows of bf16 bits, one per (page, head)); the
    arguments as ``kernel.read_pages`` passes them."""
    heads, block, sw, dim = out.shape[0] // pages.shape[0], geo[2], geo[3], k_offsets.shape[0]
    for j in numba.prange(out.shape[0]):
        tw = page(cache, geo, pages[j // heads], j % heads, sw)
        tile, rounded = np.empty((dim, block), np.float32), np.empty(block, np.uint16)
        ng = dim // min(kgroup, vgroup)
        gs, gz = np.empty((ng, block), np.float32), np.empty((ng, block), np.float32)
        dequant(tw, 0, kbits, kgroup, block, gs, gz, tile)
        place(tile, rounded, out[j], k_offsets)
        dequant(tw, kwords, vbits, vgroup, block, gs, gz, tile)
        place(tile, rounded, out[j], v_offsets)
