"""The compiled CPU decode kernel of :mod:`streamkv.kv.kernels.cpu` (numba; imported only where numba is).

One parallel loop over (row, chunk) jobs; each job walks its tokens in tiles of ``TILE``: keys
loaded channel-major (un-rotated by a fast Walsh-Hadamard transform and rotated by RoPE when stored
before RoPE), scores, an online-softmax update, values loaded token-major and accumulated. The
layout (widths, codebooks, axes, transforms) is a compile-time constant of each specialisation, so
every inner loop is branch-free; ``merge_chunks`` then reduces the jobs' partials of each row.
"""

from __future__ import annotations

from math import sqrt

import numpy as np
from numba import njit, prange

from ..packing import codes_per_word
from .cpu import CHUNKS, TILE

@njit(fastmath=True)
def merge_chunks(m_out, l_out, acc, accp, vorder, top, l, stored, plain):
    """The jobs' partials of each row merged (flash-decoding's reduction), values back to channel order."""
    rows, chunks, nq, d = acc.shape
    for r in range(rows):
        for j in range(nq):
            mx = np.float32(-1e30)
            for c in range(chunks):
                mx = max(mx, m_out[r, c, j])
            tot = np.float32(0.0)
            for m in range(d):
                stored[r, j, vorder[m]] = 0.0
                plain[r, j, m] = 0.0
            for c in range(chunks):
                w = np.exp(m_out[r, c, j] - mx)
                tot += l_out[r, c, j] * w
                for m in range(d):
                    stored[r, j, vorder[m]] += acc[r, c, j, m] * w
                    plain[r, j, m] += accp[r, c, j, m] * w
            top[r, j, 0] = mx if mx > -1e29 else 0.0  # nothing seen: a finite max, zero weight
            l[r, j, 0] = tot


# -- the attention kernel -------------------------------------------------------------------------------------
_compiled: dict = {}


def kernel_for(*layout):
    """The kernel specialised for one storage layout (widths, codebooks, axes, transforms are
    compile-time constants, so every inner loop is branch-free)."""
    if layout not in _compiled:
        _compiled[layout] = _build(*layout)
    return _compiled[layout]


def _build(KBITS, KLUT, KCH, VBITS, VLUT, VCH, KHAD, ROPE):
    f32 = np.float32
    FWHT = ROPE and KHAD  # keys un-rotated in the kernel; otherwise the query carries the rotation
    TILE_ADD = not (KHAD and not ROPE)  # outliers add to the key tile (plain domain) or to the scores
    NEG = f32(-1e30)
    LOG2E, LN2, HALF = f32(1.4426950408889634), f32(0.6931471805599453), f32(0.5)
    C2, C3, C4, C5, C6 = f32(1 / 2), f32(1 / 6), f32(1 / 24), f32(1 / 120), f32(1 / 720)
    ONE, ZERO, CUT = f32(1.0), f32(0.0), f32(-87.0)
    KPER = codes_per_word(KBITS)
    load_k = _tile_loader(KBITS, KLUT, KCH, False)  # channel-major: every loop runs over the tile's tokens
    load_v = _tile_loader(VBITS, VLUT, VCH, True)  # token-major: outputs vectorise over channels

    @njit(inline="always", fastmath=True)
    def fexp(x, pow2):
        """exp(x) for x <= 0 (0 below -87): 2^n from a table times a degree-6 polynomial on |f| <= ln2/2."""
        y = max(x, CUT) * LOG2E
        n = np.floor(y + HALF)
        f = (y - n) * LN2
        p = ONE + f * (ONE + f * (C2 + f * (C3 + f * (C4 + f * (C5 + f * C6)))))
        return p * pow2[np.int32(-n)] if x > CUT else ZERO

    @njit(inline="always")
    def first_at(ptr, tok, r, a):
        """Index of the first outlier of row ``r`` at a token >= ``a`` (outliers sorted by row, token)."""
        lo, hi = ptr[r], ptr[r + 1]
        while lo < hi:
            mid = (lo + hi) // 2
            if tok[mid] < a:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @njit(parallel=True, fastmath=True)
    def kernel(qc, qp, kc, ks, kz, klut, kunit, kgroup, vc, vs, vz, vlut, vunit, vgroup, cosw, sinw, partner, start,
               kptr, ktok, kch, kval, vptr, vtok, vch, vval, mask, has_mask, heads, ql, skip, t0, t1, pow2,
               m_out, l_out, acc_out, accp_out):
        rows, nq, d = qc.shape
        kwords = d // KPER
        scale_h = f32(1.0 / sqrt(d)) if FWHT else ONE  # the Hadamard's normalisation, folded into the scale
        base = t0 // TILE * TILE
        size = ((t1 - base + CHUNKS - 1) // CHUNKS + TILE - 1) // TILE * TILE
        first = max(skip, t0)
        for job in prange(rows * CHUNKS):
            r, ch = job // CHUNKS, job % CHUNKS
            a, b = base + ch * size, min(t1, base + (ch + 1) * size)
            bt = r // heads
            K = np.zeros((d, TILE), np.float32)
            K2 = np.zeros((d, TILE), np.float32)
            V = np.zeros((TILE, d), np.float32)
            S = np.empty((nq, TILE), np.float32)
            m_run = np.full(nq, NEG, np.float32)
            l_run = np.zeros(nq, np.float32)
            acc = np.zeros((nq, d), np.float32)
            accp = np.zeros((nq, d), np.float32)
            ko, vo = first_at(kptr, ktok, r, a), first_at(vptr, vtok, r, a)
            kend, vend = kptr[r + 1], vptr[r + 1]
            for a0 in range(a, b, TILE):
                n = min(TILE, b - a0)
                load_k(kc, ks, kz, klut, kunit, kgroup, r, a0, n, scale_h, K)
                if FWHT:  # un-rotate: x = x̃ H (H symmetric and orthonormal; its scale folded above)
                    h = 1
                    while h < d:
                        for i in range(0, d, 2 * h):
                            for j in range(i, i + h):
                                for tt in range(TILE):
                                    x, y = K[j, tt], K[j + h, tt]
                                    K[j, tt] = x + y
                                    K[j + h, tt] = x - y
                        h *= 2
                if TILE_ADD:
                    while ko < kend and ktok[ko] < a0 + n:
                        c = kch[ko]
                        K[(c % KPER) * kwords + c // KPER, ktok[ko] - a0] += kval[ko]
                        ko += 1
                if ROPE:
                    p0 = start + a0  # the table reaches a whole tile past the segment (cpu.attend)
                    for m in range(d):
                        # row views, indexed by the loop counter alone: no negative-index checks,
                        # so the loop vectorises
                        out, x, y = K2[m], K[m], K[partner[m]]
                        c, s_ = cosw[m, p0 : p0 + TILE], sinw[m, p0 : p0 + TILE]
                        for tt in range(TILE):
                            out[tt] = x[tt] * c[tt] + y[tt] * s_[tt]
                    KS = K2
                else:
                    KS = K
                for j in range(nq):
                    for tt in range(TILE):
                        S[j, tt] = ZERO
                    for m in range(d):
                        qv = qc[r, j, m]
                        for tt in range(TILE):
                            S[j, tt] += qv * KS[m, tt]
                if not TILE_ADD:  # rotated keys: outliers (plain domain) meet the plain query
                    while ko < kend and ktok[ko] < a0 + n:
                        tt, c, x = ktok[ko] - a0, kch[ko], kval[ko]
                        for j in range(nq):
                            S[j, tt] += qp[r, j, c] * x
                        ko += 1
                if n < TILE or a0 < first or has_mask:  # tokens of the tile this query does not see
                    for j in range(nq):
                        qi = j % ql
                        for tt in range(TILE):
                            t = a0 + tt
                            if tt >= n or t < first or (has_mask and not mask[bt, qi, t]):
                                S[j, tt] = NEG
                # online softmax: rescale what this job holds to the new maximum, then add the tile
                for j in range(nq):
                    mx = NEG
                    for tt in range(TILE):
                        mx = max(mx, S[j, tt])
                    if mx > m_run[j]:
                        corr = fexp(m_run[j] - mx, pow2)
                        l_run[j] *= corr
                        for m in range(d):
                            acc[j, m] *= corr
                            accp[j, m] *= corr
                        m_run[j] = mx
                    tot = ZERO
                    for tt in range(TILE):
                        p = fexp(S[j, tt] - m_run[j], pow2) if S[j, tt] > NEG else ZERO
                        S[j, tt] = p
                        tot += p
                    l_run[j] += tot
                # values of the tile (token-major) in their stored domain, weighted by the probabilities
                load_v(vc, vs, vz, vlut, vunit, vgroup, r, a0, n, ONE, V)
                for j in range(nq):
                    for tt in range(n):
                        p = S[j, tt]
                        for m in range(d):
                            acc[j, m] += p * V[tt, m]
                while vo < vend and vtok[vo] < a0 + n:
                    tt, c, x = vtok[vo] - a0, vch[vo], vval[vo]
                    for j in range(nq):
                        accp[j, c] += S[j, tt] * x
                    vo += 1
            for j in range(nq):
                m_out[r, ch, j] = m_run[j]
                l_out[r, ch, j] = l_run[j]
                for m in range(d):
                    acc_out[r, ch, j, m] = acc[j, m]
                    accp_out[r, ch, j, m] = accp[j, m]

    return kernel


def _tile_loader(BITS, LUT, CHANNEL, TOKEN_MAJOR):
    """``load(codes, scale, zero, lut, unit, group, r, a0, n, extra, out)``: tokens ``a0 .. a0 + n`` of
    row ``r`` dequantized (times ``extra``) into ``out``, word layout: ``out[:, :n]`` of (dim, TILE),
    or ``out[:n]`` of (TILE, dim) when ``TOKEN_MAJOR``."""
    PER = codes_per_word(BITS)
    MASK = (1 << BITS) - 1
    WB = 3 if BITS == 3 else 1
    f32 = np.float32

    @njit(inline="always", fastmath=True)
    def load(codes, scale, zero, lut, unit, group, r, a0, n, extra, out):
        d = out.shape[1] if TOKEN_MAJOR else out.shape[0]
        words = d // PER
        held = d if TOKEN_MAJOR and CHANNEL else 0  # token-major per-channel units: the unit's scale, zero
        sw = np.empty(held, np.float32)
        zw = np.empty(held, np.float32)
        u_now = -1
        per_token = n
        if not TOKEN_MAJOR and CHANNEL and BITS != 3 and unit % TILE == 0 and n == TILE:
            # a whole tile inside one unit: its bytes are one (TILE, words) block; read it column by
            # column so that every store runs along the tile's tokens
            u = a0 // unit
            o = (a0 - u * unit) * words
            blk = codes[r, u, o : o + TILE * words].reshape((TILE, words))  # indexed by loop counters only
            for i in range(words):
                for k in range(PER):
                    row = out[k * words + i]
                    for tt in range(TILE):
                        c = (np.int32(blk[tt, i]) >> (k * BITS)) & MASK
                        row[tt] = lut[c] if LUT else f32(c)
            per_token = 0  # nothing left for the per-token unpacking below
        for tt in range(per_token):
            t = a0 + tt
            u = t // unit if CHANNEL else t
            cu = codes[r, u]
            o = (t - u * unit) * words * WB if CHANNEL else 0
            for k in range(PER):  # unpack one token's contiguous bytes
                for i in range(words):
                    if BITS == 3:
                        w = np.int32(cu[o + 3 * i]) | (np.int32(cu[o + 3 * i + 1]) << 8) | (np.int32(cu[o + 3 * i + 2]) << 16)
                        c = (w >> (3 * k)) & 7
                    else:
                        c = (np.int32(cu[o + i]) >> (k * BITS)) & MASK
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

    return load
