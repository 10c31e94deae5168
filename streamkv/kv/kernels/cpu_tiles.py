"""Tile loading of the compiled CPU decode kernel (numba; imported only where numba is): packed codes
of a tile of tokens unpacked and dequantized into a float tile, channel-major (keys: every later step
is a vector operation over tokens) or token-major (values)."""

from __future__ import annotations

import numpy as np
from numba import njit

from ..storage.packing import codes_per_word
from .cpu_layout import TILE
from .disk_cache import tagged


def tile_loader(BITS, LUT, CHANNEL, TOKEN_MAJOR):
    """``load(codes, scale, zero, lut, unit, group, r, a0, n, extra, out, tw)``: tokens ``a0 .. a0 + n``
    of row ``r`` dequantized (times ``extra``) into ``out``, word layout: ``out[:, :n]`` of (dim, TILE),
    or ``out[:n]`` of (TILE, dim) when ``TOKEN_MAJOR``; ``tw`` is scratch of (dim, TILE) uint32."""
    PER = codes_per_word(BITS)
    MASK = (1 << BITS) - 1
    WB = 3 if BITS == 3 else 1  # bytes per packing word
    WPW = 1 if BITS == 3 else 4  # packing words per staged 32-bit word
    f32 = np.float32

    @njit(inline="always")
    def word(cu, o, i):
        """Packing word ``i`` of the bytes from ``cu[o]`` as a 32-bit word: code ``k`` at bit ``k * BITS``
        (three-bit codes: eight in three little-endian bytes)."""
        if BITS == 3:
            b = o + 3 * i
            return np.uint32(cu[b]) | (np.uint32(cu[b + 1]) << 8) | (np.uint32(cu[b + 2]) << 16)
        return np.uint32(cu[o + i])

    @njit(fastmath=True)
    def load(codes, scale, zero, lut, unit, group, r, a0, n, extra, out, tw):
        d = out.shape[1] if TOKEN_MAJOR else out.shape[0]
        words = d // PER
        if not TOKEN_MAJOR and CHANNEL and unit % TILE == 0 and n == TILE and (BITS == 3 or words % 4 == 0):
            # a whole tile inside one unit. Its words are staged transposed, (staged word, token), so
            # every unpacking step is a vector operation along the tile's tokens: a 32-bit word holds
            # WPW packing words (its TILE x words bytes are one block, moved as 32-bit words), and
            # code kk of staged word w sits at bit kk * BITS: word-layout position (kk % PER) * words
            # + WPW * w + kk // PER.
            u = a0 // unit
            o = a0 - u * unit
            staged = words // WPW
            if BITS == 3:
                cu = codes[r, u]
                for tt in range(TILE):
                    for w in range(staged):
                        tw[w, tt] = word(cu, (o + tt) * words * WB, w)
            else:
                blk = codes[r, u].view(np.uint32)[o * staged : (o + TILE) * staged].reshape((TILE, staged))
                for tt in range(TILE):
                    for w in range(staged):
                        tw[w, tt] = blk[tt, w]
            for w in range(staged):
                src = tw[w]
                for kk in range(WPW * PER):
                    k, byte = kk % PER, WPW * w + kk // PER
                    row = out[k * words + byte]
                    s, z = scale[r, u, byte * PER + k] * extra, zero[r, u, byte * PER + k] * extra
                    for tt in range(TILE):
                        c = np.int32((src[tt] >> (kk * BITS)) & MASK)
                        row[tt] = (lut[c] if LUT else f32(c)) * s + z
            return  # unpacked and dequantized
        if TOKEN_MAJOR and not CHANNEL and scale.shape[2] == 1:
            # one group per token (the default values): each token's words staged (tw's first row),
            # then unpacked straight into its dequantized row
            wv = tw.reshape(tw.size)  # a token's words may outnumber a tile's tokens
            for tt in range(n):
                t = a0 + tt
                s1, z1 = scale[r, t, 0] * extra, zero[r, t, 0] * extra
                cu = codes[r, t]
                for i in range(words):
                    wv[i] = word(cu, 0, i)
                for k in range(PER):
                    seg = out[tt, k * words : (k + 1) * words]
                    for i in range(words):
                        c = np.int32((wv[i] >> (k * BITS)) & MASK)
                        seg[i] = (lut[c] if LUT else f32(c)) * s1 + z1
            return
        held = d if TOKEN_MAJOR and CHANNEL else 0  # token-major per-channel units: the unit's scale, zero
        sw = np.empty(held, np.float32)
        zw = np.empty(held, np.float32)
        u_now = -1
        for tt in range(n):
            t = a0 + tt
            u = t // unit if CHANNEL else t
            cu = codes[r, u]
            o = (t - u * unit) * words * WB if CHANNEL else 0
            for k in range(PER):  # unpack one token's contiguous bytes
                for i in range(words):
                    c = np.int32((word(cu, o, i) >> (k * BITS)) & MASK)
                    x = lut[c] if LUT else f32(c)
                    if TOKEN_MAJOR:
                        out[tt, k * words + i] = x
                    else:
                        out[k * words + i, tt] = x
            if TOKEN_MAJOR:  # dequantize the token's row
                if CHANNEL:
                    if u != u_now:  # a new unit: its per-channel scales in word layout
                        u_now = u
                        for m in range(d):
                            c = (m % words) * PER + m // words
                            sw[m], zw[m] = scale[r, u, c] * extra, zero[r, u, c] * extra
                    for m in range(d):
                        out[tt, m] = out[tt, m] * sw[m] + zw[m]
                elif scale.shape[2] == 1:  # one group per token: a scalar scale
                    s1, z1 = scale[r, t, 0] * extra, zero[r, t, 0] * extra
                    for m in range(d):
                        out[tt, m] = out[tt, m] * s1 + z1
                else:
                    for m in range(d):
                        g = ((m % words) * PER + m // words) // group
                        out[tt, m] = out[tt, m] * scale[r, t, g] * extra + zero[r, t, g] * extra
        if TOKEN_MAJOR:
            return
        if CHANNEL and unit % TILE == 0:  # the tile lies in one unit: one scale per channel
            u = a0 // unit
            for m in range(d):
                c = (m % words) * PER + m // words
                s, z = scale[r, u, c] * extra, zero[r, u, c] * extra
                for tt in range(TILE):
                    out[m, tt] = out[m, tt] * s + z
        elif CHANNEL:  # small units: each run of the tile within one unit
            for u in range(a0 // unit, (a0 + n - 1) // unit + 1):
                lo, hi = max(u * unit - a0, 0), min((u + 1) * unit - a0, n)
                for m in range(d):
                    c = (m % words) * PER + m // words
                    s, z = scale[r, u, c] * extra, zero[r, u, c] * extra
                    for tt in range(lo, hi):
                        out[m, tt] = out[m, tt] * s + z
        else:  # per-token groups: gather each group's scales once, then whole rows
            groups = scale.shape[2]
            sv = np.empty((groups, TILE), np.float32)
            zv = np.empty((groups, TILE), np.float32)
            for tt in range(n):
                for g in range(groups):
                    sv[g, tt] = scale[r, a0 + tt, g] * extra
                    zv[g, tt] = zero[r, a0 + tt, g] * extra
            for m in range(d):
                g = ((m % words) * PER + m // words) // group
                for tt in range(n):
                    out[m, tt] = out[m, tt] * sv[g, tt] + zv[g, tt]

    tagged((BITS, LUT, CHANNEL, TOKEN_MAJOR), word, load)
    return load
