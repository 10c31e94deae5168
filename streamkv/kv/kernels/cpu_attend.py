"""The compiled CPU decode kernel of :mod:`streamkv.kv.kernels.cpu` (numba; imported only where numba is).

One parallel loop over (row, chunk) jobs; each job walks its tokens in tiles of ``TILE``: keys
loaded channel-major (un-rotated by a fast Walsh-Hadamard transform and rotated by RoPE when stored
before RoPE), scores, an online-softmax update, values loaded token-major and accumulated (tiles from
:mod:`.cpu_tiles`). The layout (widths, codebooks, axes, transforms) is a compile-time constant of
each specialisation, so every inner loop is branch-free; the call ends by reducing the jobs' partials
of each row (:func:`.cpu_merge.merge_chunks`).
"""

from __future__ import annotations

from math import sqrt

import numpy as np
from numba import njit, prange

from ..storage import packing
from ..storage.packing import codes_per_word
from . import cpu_layout, cpu_merge, cpu_tiles
from .cpu_layout import TILE
from .cpu_merge import merge_chunks
from .cpu_tiles import tile_loader
from .disk_cache import on_disk, tagged

# -- the attention kernel -------------------------------------------------------------------------------------
_compiled: dict = {}
_SOURCES = tuple(m.__file__ for m in (packing, cpu_layout, cpu_merge, cpu_tiles)) + (__file__,)


def kernel_for(*layout):
    """The kernel specialised for one storage layout (widths, codebooks, axes, transforms are
    compile-time constants, so every inner loop is branch-free), compiled once per machine: later
    processes load it from disk (:mod:`.disk_cache`)."""
    if layout not in _compiled:
        _compiled[layout] = on_disk(_build(*layout), layout, _SOURCES)
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
    load_k = tile_loader(KBITS, KLUT, KCH, False)  # channel-major: every loop runs over the tile's tokens
    load_v = tile_loader(VBITS, VLUT, VCH, True)  # token-major: outputs vectorise over channels

    @njit(fastmath=True)
    def exp_tile(s, mx, P, E, F):
        """``s[:] = exp(s - mx)`` (0 where ``s`` is masked), returning the sum: a degree-6 polynomial on
        ``|f| <= ln2/2`` times ``2^n`` built in the exponent bits of ``E``, which ``F`` views as float32
        (no table lookup, so both loops vectorise)."""
        for tt in range(TILE):
            y = max(s[tt] - mx, CUT) * LOG2E
            n = np.floor(y + HALF)
            f = (y - n) * LN2
            P[tt] = ONE + f * (ONE + f * (C2 + f * (C3 + f * (C4 + f * (C5 + f * C6)))))
            E[tt] = (np.int32(n) + np.int32(127)) << np.int32(23)
        tot = ZERO
        for tt in range(TILE):
            p = P[tt] * F[tt] if s[tt] > NEG else ZERO
            s[tt] = p
            tot += p
        return tot

    @njit(fastmath=True)
    def fwht(K):
        """In-place fast Walsh-Hadamard transform over the rows of a (d, TILE) tile: two butterfly
        stages per pass over four rows (fewer loads and stores), a last single stage when log2 d is odd.
        Row views indexed by the loop counter alone, so every inner loop vectorises."""
        d = K.shape[0]
        h = 1
        while 4 * h <= d:
            for i in range(0, d, 4 * h):
                for j in range(i, i + h):
                    a, b, c, e = K[j], K[j + h], K[j + 2 * h], K[j + 3 * h]
                    for tt in range(TILE):
                        x0, x1, x2, x3 = a[tt], b[tt], c[tt], e[tt]
                        s0, d0, s1, d1 = x0 + x1, x0 - x1, x2 + x3, x2 - x3
                        a[tt] = s0 + s1
                        b[tt] = d0 + d1
                        c[tt] = s0 - s1
                        e[tt] = d0 - d1
            h *= 4
        if h < d:
            for j in range(h):
                u, w = K[j], K[j + h]
                for tt in range(TILE):
                    x, y = u[tt], w[tt]
                    u[tt] = x + y
                    w[tt] = x - y

    @njit
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

    @njit(fastmath=True)
    def one_job(ri, ch, qk, qp, mask, has_mask, korder, kc, ks, kz, klut, kunit, kgroup, vc, vs, vz, vlut, vunit,
                vgroup, rco, rso, rbase, partner, kptr, ktok, kch, kval, vptr, vtok, vch, vval, heads, ql, first,
                base, size, t1, rowlist, krow, vrow, off, koff, voff, m_out, l_out, acc_out, accp_out):
        """Job ``(ri, ch)`` of :func:`kernel`: its row's tokens of chunk ``ch``, into its slot of the
        partials. A function of its own rather than the parallel loop's body, so numba's parallel passes
        see a one-line loop: they were most of the time each layout took to compile."""
        nq, d = qk.shape[1], qk.shape[2]
        kwords = d // KPER
        scale_h = f32(1.0 / sqrt(d)) if FWHT else ONE  # the Hadamard's normalisation, folded into the scale
        r = rowlist[ri]  # the segment's row: queries, outliers, mask, outputs
        kr, vr = krow[r], vrow[r]  # its row in the key and value blocks
        a, b = base + ch * size, min(t1, base + (ch + 1) * size)
        bt = r // heads
        K = np.zeros((d, TILE), np.float32)
        K2 = np.zeros((d, TILE), np.float32)
        V = np.zeros((TILE, d), np.float32)
        P = np.empty(TILE, np.float32)
        E = np.empty(TILE, np.int32)
        F = E.view(np.float32)  # E's bits as float32: 2^n
        TW = np.empty((d, TILE), np.uint32)  # a key tile's 32-bit words, transposed
        S = np.empty((nq, TILE), np.float32)
        m_run = np.full(nq, NEG, np.float32)
        l_run = np.zeros(nq, np.float32)
        acc = np.zeros((nq, d), np.float32)
        accp = np.zeros((nq, d), np.float32)
        ko, vo = first_at(kptr, ktok, r, a + off), first_at(vptr, vtok, r, a + off)
        kend, vend = kptr[r + 1], vptr[r + 1]
        for a0 in range(a, b, TILE):
            n = min(TILE, b - a0)
            load_k(kc, ks, kz, klut, kunit, kgroup, kr, a0 + koff, n, scale_h, K, TW)
            if FWHT:  # un-rotate: x = x̃ H (H symmetric and orthonormal; its scale folded above)
                fwht(K)
            if TILE_ADD:
                while ko < kend and ktok[ko] < a0 + off + n:
                    c = kch[ko]
                    K[(c % KPER) * kwords + c // KPER, ktok[ko] - off - a0] += kval[ko]
                    ko += 1
            if ROPE:
                kt = (a0 + off) // TILE  # RoPE at p0 + tt by angle addition: the tile's base angle, the offset's
                for m in range(d):
                    # row views, indexed by the loop counter alone: no negative-index checks,
                    # so the loop vectorises
                    out, x, y = K2[m], K[m], K[partner[m]]
                    c, s_ = rco[m], rso[m]
                    a1, b1, a2, b2 = rbase[kt, 0, m], rbase[kt, 1, m], rbase[kt, 2, m], rbase[kt, 3, m]
                    for tt in range(TILE):
                        out[tt] = c[tt] * (a1 * x[tt] + b1 * y[tt]) + s_[tt] * (a2 * x[tt] + b2 * y[tt])
                KS = K2
            else:
                KS = K
            for j in range(nq):
                for tt in range(TILE):
                    S[j, tt] = ZERO
                sj = S[j]
                for m in range(0, d, 4):  # four channels per pass over the scores (d % 8 == 0)
                    q0, q1, q2, q3 = qk[r, j, korder[m]], qk[r, j, korder[m + 1]], qk[r, j, korder[m + 2]], qk[r, j, korder[m + 3]]
                    k0, k1, k2, k3 = KS[m], KS[m + 1], KS[m + 2], KS[m + 3]
                    for tt in range(TILE):
                        sj[tt] += q0 * k0[tt] + q1 * k1[tt] + q2 * k2[tt] + q3 * k3[tt]
            if not TILE_ADD:  # rotated keys: outliers (plain domain) meet the plain query
                while ko < kend and ktok[ko] < a0 + off + n:
                    tt, c, x = ktok[ko] - off - a0, kch[ko], kval[ko]
                    for j in range(nq):
                        S[j, tt] += qp[r, j, c] * x
                    ko += 1
            if n < TILE or a0 < first or has_mask:  # tokens of the tile this query does not see
                for j in range(nq):
                    qi = j % ql
                    for tt in range(TILE):
                        t = a0 + tt
                        if tt >= n or t < first or (has_mask and not mask[bt, qi, t + off]):
                            S[j, tt] = NEG
            # online softmax: rescale what this job holds to the new maximum, then add the tile
            for j in range(nq):
                mx = NEG
                for tt in range(TILE):
                    mx = max(mx, S[j, tt])
                if mx > m_run[j]:
                    corr = np.exp(m_run[j] - mx)
                    l_run[j] *= corr
                    for m in range(d):
                        acc[j, m] *= corr
                        accp[j, m] *= corr
                    m_run[j] = mx
                l_run[j] += exp_tile(S[j], m_run[j], P, E, F)
            # values of the tile (token-major) in their stored domain, weighted by the probabilities
            load_v(vc, vs, vz, vlut, vunit, vgroup, vr, a0 + voff, n, ONE, V, TW)
            for j in range(nq):
                aj = acc[j]
                for tt in range(0, TILE, 4):  # four tokens per pass (past n: probability 0, V finite)
                    p0, p1, p2, p3 = S[j, tt], S[j, tt + 1], S[j, tt + 2], S[j, tt + 3]
                    v0, v1, v2, v3 = V[tt], V[tt + 1], V[tt + 2], V[tt + 3]
                    for m in range(d):
                        aj[m] += p0 * v0[m] + p1 * v1[m] + p2 * v2[m] + p3 * v3[m]
            while vo < vend and vtok[vo] < a0 + off + n:
                tt, c, x = vtok[vo] - off - a0, vch[vo], vval[vo]
                for j in range(nq):
                    accp[j, c] += S[j, tt] * x
                vo += 1
        for j in range(nq):
            m_out[ri, ch, j] = m_run[j]
            l_out[ri, ch, j] = l_run[j]
            for m in range(d):
                acc_out[ri, ch, j, m] = acc[j, m]
                accp_out[ri, ch, j, m] = accp[j, m]

    @njit(parallel=True, fastmath=True)
    def kernel(qk, qp, mask, has_mask, top, l, stored, plain, slot, korder, vorder, kc, ks, kz, klut, kunit, kgroup,
               vc, vs, vz, vlut, vunit, vgroup, rco, rso, rbase, partner, kptr, ktok, kch, kval, vptr, vtok, vch, vval,
               heads, ql, skip, t0, t1, chunks, rowlist, krow, vrow, off, koff, voff):
        """Tokens ``t0 .. t1`` of a piece that starts ``off`` tokens into its segment and ``koff`` /
        ``voff`` tokens into the key / value block (all multiples of TILE), for the segment rows
        ``rowlist``; row ``g`` of the segment is row ``krow[g]`` / ``vrow[g]`` of the key / value
        block (a block may hold only the rows of one width). The step's arguments come first (the
        queries, the mask's columns, the outputs and their ``slot``), those fixed while the piece is
        stored after them."""
        rows = rowlist.shape[0]
        nq, d = qk.shape[1], qk.shape[2]
        base = t0 // TILE * TILE
        size = ((t1 - base + chunks - 1) // chunks + TILE - 1) // TILE * TILE
        first = max(skip - off, t0)
        m_out = np.empty((rows, chunks, nq), np.float32)
        l_out = np.empty((rows, chunks, nq), np.float32)
        acc_out = np.empty((rows, chunks, nq, d), np.float32)
        accp_out = np.empty((rows, chunks, nq, d), np.float32)
        for job in prange(rows * chunks):
            one_job(job // chunks, job % chunks, qk, qp, mask, has_mask, korder, kc, ks, kz, klut, kunit, kgroup, vc,
                    vs, vz, vlut, vunit, vgroup, rco, rso, rbase, partner, kptr, ktok, kch, kval, vptr, vtok, vch,
                    vval, heads, ql, first, base, size, t1, rowlist, krow, vrow, off, koff, voff, m_out, l_out,
                    acc_out, accp_out)
        merge_chunks(m_out, l_out, acc_out, accp_out, vorder, rowlist, top[slot], l[slot], stored[slot], plain[slot])

    tagged((KBITS, KLUT, KCH, VBITS, VLUT, VCH, KHAD, ROPE), exp_tile, fwht, first_at, one_job, kernel)
    return kernel
