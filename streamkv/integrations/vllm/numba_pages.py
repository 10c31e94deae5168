"""A word-major page's keys or values dequantized along its tokens (numba), shared by the compiled
decode (``numba_decode.py``) and read (``numba_read.py``); imported late, like them (see ``kernel.py``).

A page holds word ``w`` of its tokens' slots as one row (``codec.py``), so each step below is a loop
along the page's tokens that vectorizes. Codes are unpacked by 32-bit word: lane ``kk * words + w``
holds code ``kk`` of word ``w``, i.e. channel ``w * per + kk`` (3 bits: natural order, codes cross
words), and a word's codes are all in one group (``kernel.lanes`` gives the channel of each lane).
fp16 scales and zeros are widened without branches (``numba_formats.half_scaled_bits``).
"""

import numba
import numpy as np

from .numba_formats import HALF_SCALE, half_scaled_bits

jit = numba.njit(inline="always", cache=True)  # inlined: the caller's fastmath setting applies


@jit
def meta(tw, at, ng, nt, gs, gz):  # the fp16 (scale, zero) of ng groups (one 32-bit word each) from row tw[at]
    sb, zb = gs.view(np.uint32), gz.view(np.uint32)
    for gi in range(ng):
        for t in range(nt):  # little-endian: scale in the low half, zero in the high half
            w = tw[at + gi, t]
            sb[gi, t], zb[gi, t] = half_scaled_bits(w), half_scaled_bits(w >> np.uint32(16))
        for t in range(nt):
            gs[gi, t] *= HALF_SCALE
            gz[gi, t] *= HALF_SCALE


@jit
def code(x, kk, bits):
    """Code ``kk`` of 32-bit word ``x`` (``bits`` of 2, 4 or 8 wide), as float32."""
    return np.float32(np.int32((x >> np.uint32(kk * bits)) & np.uint32((1 << bits) - 1)))


@jit
def dequant(tw, at, bits, group, nt, gs, gz, tile):
    """Tokens ``:nt`` of a page's keys (or values) of one head, whose 32-bit words are rows ``tw[at:]`` (one
    column per token), into ``tile`` (lanes x tokens; ``gs``/``gz`` scratch of (groups, tokens)). Each
    width is its own branch, so its shifts and masks are constants."""
    if bits == 4:
        dequant_width(tw, at, 4, group, nt, gs, gz, tile)
    elif bits == 8:
        dequant_width(tw, at, 8, group, nt, gs, gz, tile)
    elif bits == 2:
        dequant_width(tw, at, 2, group, nt, gs, gz, tile)
    else:
        dequant_width(tw, at, 3, group, nt, gs, gz, tile)


@jit
def dequant_width(tw, at, bits, group, nt, gs, gz, tile):
    dim = tile.shape[0]
    if bits == 3:  # codes cross words: natural order, bit 3i of the stream
        meta(tw, at + 3 * dim // 32, dim // group, nt, gs, gz)
        for i in range(dim):
            wi, o = at + ((3 * i) >> 5), np.uint32((3 * i) & 31)
            gi = i // group
            for t in range(nt):
                x = tw[wi, t] >> o
                if o > 29:
                    x |= tw[wi + 1, t] << (np.uint32(32) - o)
                tile[i, t] = np.float32(np.int32(x & np.uint32(7))) * gs[gi, t] + gz[gi, t]
        return
    per = 32 // bits
    words = dim // per
    meta(tw, at + words, dim // group, nt, gs, gz)
    for w in range(words):
        gi = w // (group // per)
        for kk in range(per):
            lane = kk * words + w
            for t in range(nt):
                tile[lane, t] = code(tw[at + w, t], kk, bits) * gs[gi, t] + gz[gi, t]


@jit
def page(cache, geo, pg, h, sw):
    """Page ``pg``'s words of KV head ``h`` as (words x tokens) rows: a view, nothing copied."""
    base = pg * geo[0] + h * geo[1]
    return cache[base:base + sw * geo[2]].reshape((sw, geo[2]))
