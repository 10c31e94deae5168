"""The fused decode attention (numba), imported by ``kernel.py`` on the first decode step only (never at
import time: vLLM 0.32's CPU worker dies at start if numba is loaded; see ``kernel.py``).

Why: a decode step's query is one token, so writing the whole history out as bf16 pages for vLLM's
kernel (the read path) costs far more than the attention itself. Here one job per (sequence, KV head)
takes the step's own rows as vLLM hands them (bf16 bits or float32) and reads its packed slots a page
at a time, for all the GQA query heads of that KV head:

* the queries are rotated into the slots' Hadamard domain in the job (``q Hk``, scaled), and the
  output rotated back at its end (``Hvᵀ``): no torch op runs around the kernel;
* a page is read as it is stored, word-major, every loop along its tokens (``Hk``/``Hv`` are the
  Hadamard matrix with its columns in the codes' lane order, ``numba_pages.py``, so nothing is
  re-interleaved): its keys scored against each query head straight from their words (:func:`scores`;
  3-bit keys, whose codes cross words, through a dequantized tile), its softmax online across pages
  and exact within one (float32 throughout, a polynomial ``exp``), its values dequantized into a
  float32 (lanes x tokens) tile and accumulated;
* the step's own key and value last, at full precision (the chunked-prefill rule), un-rotated: the
  rotation is orthonormal, so ``q·k`` and ``p v`` need none.

Every function is top-level (numba's on-disk cache). One entry serves every layout: with the loops
running along tokens, the sizes as compile-time constants measured no faster.
"""

import numba
import numpy as np

from .numba_formats import narrow, widen
from .numba_pages import code, dequant, meta, page

jit = numba.njit(inline="always", cache=True, fastmath=True)
LOW = np.float32(-3.0e38)  # the running max before any score (finite: fastmath assumes no infinities)


@jit
def scores(tw, bits, group, nt, gs, gz, qr, qz, p):
    """``p[a, :nt]``: query ``a``'s scores of a page's keys read straight from their words (2, 4 or 8
    bits; ``qz[a, w]``: the sum of ``qr[a]`` over word ``w``'s lanes). A word's codes share one group, so
    ``q·k = scale · Σ q·code + zero · Σ q`` per word, and the key is never written out as floats: each
    word is loaded once per query and unpacked in registers (its ``per`` codes unrolled, the loop runs
    along tokens)."""
    if bits == 4:
        scores_width(tw, 4, group, nt, gs, gz, qr, qz, p)
    elif bits == 8:
        scores_width(tw, 8, group, nt, gs, gz, qr, qz, p)
    else:
        scores_width(tw, 2, group, nt, gs, gz, qr, qz, p)


@jit
def scores_width(tw, bits, group, nt, gs, gz, qr, qz, p):
    per = 32 // bits
    dim = qr.shape[1]
    words = dim // per
    meta(tw, words, dim // group, nt, gs, gz)
    for a in range(qr.shape[0]):
        for t in range(nt):
            p[a, t] = 0
        for w in range(words):
            gi = w // (group // per)
            qzw = qz[a, w]
            for t in range(nt):
                x = tw[w, t]
                y = np.float32(0)
                for kk in range(per):
                    y += qr[a, kk * words + w] * code(x, kk, bits)
                p[a, t] += gs[gi, t] * y + gz[gi, t] * qzw


@jit
def exp_into(x, m, n):
    """``x[:n] = exp(x[:n] - m)`` (every ``x - m <= 0``) and their sum: ``2**round(y) · 2**f`` with a
    degree-6 polynomial for ``2**f = e**(f ln 2)`` (|f| <= 1/2, relative error < 2e-7) and the power of
    two added to the exponent bits, so the loop vectorizes (a libm ``exp`` per score does not)."""
    bits = x.view(np.int32)
    for t in range(n):
        y = max((x[t] - m) * np.float32(1.4426950408889634), np.float32(-125.0))
        k = np.floor(y + np.float32(0.5))
        f = (y - k) * np.float32(0.6931471805599453)  # 2**(y - k) = e**f
        x[t] = np.float32(1.0) + f * (np.float32(1.0) + f * (np.float32(1 / 2) + f * (np.float32(1 / 6) + f * (
            np.float32(1 / 24) + f * (np.float32(1 / 120) + f * np.float32(1 / 720))))))
        bits[t] += np.int32(k) << 23
    total = np.float32(0)
    for t in range(n):
        total += x[t]
    return total


@jit
def job(cache, geo, table, past, rows, q, k_own, v_own, out, hk, hvt, scale, j, kbits, kgroup, vbits, vgroup,
        kwords, dim):
    """Sequence ``j // heads`` (step row ``rows[s]``), KV head ``j % heads``: its query heads' output."""
    heads, block, sw = k_own.shape[1], geo[2], geo[3]
    s, h = j // heads, j % heads
    r, g = rows[s], q.shape[1] // heads
    x, own_k, own_v = np.empty(dim, np.float32), np.empty(dim, np.float32), np.empty(dim, np.float32)
    widen(k_own[r, h], own_k)
    widen(v_own[r, h], own_v)
    qr = np.zeros((g, dim), np.float32)  # scale · q Hk: the queries in the keys' lanes
    own = np.empty(g, np.float32)  # the own token's scores
    for a in range(g):
        widen(q[r, h * g + a], x)
        y = np.float32(0)
        for i in range(dim):
            y += x[i] * own_k[i]
            xi = x[i] * np.float32(scale)
            for c in range(dim):
                qr[a, c] += xi * hk[i, c]
        own[a] = y * np.float32(scale)
    tile = np.empty((dim, block), np.float32)  # its keys, then its values (a row per lane)
    kper = 32 // kbits if kbits != 3 else 1
    kw = dim // kper
    qz = np.zeros((g, kw), np.float32)  # each query's sum over the lanes of each key word
    for a in range(g):
        for kk in range(kper):
            for w in range(kw):
                qz[a, w] += qr[a, kk * kw + w]
    ng = dim // min(kgroup, vgroup)
    gs, gz = np.empty((ng, block), np.float32), np.empty((ng, block), np.float32)  # scale, zero per group
    p = np.empty((g, block), np.float32)  # the page's scores, then its weights
    acc = np.zeros((g, dim), np.float32)  # Σ p v, in the values' lanes
    top = np.full(g, LOW, np.float32)  # running max
    total = np.zeros(g, np.float32)  # running Σ p
    n = past[s]
    for b0 in range(0, n, block):
        nt = min(block, n - b0)
        tw = page(cache, geo, table[s, b0 // block], h, sw)
        if kbits == 3:  # codes cross words: dequantized into the tile first
            dequant(tw, 0, kbits, kgroup, nt, gs, gz, tile)
            for a in range(g):
                for t in range(nt):
                    p[a, t] = 0
                for c in range(dim):
                    qc = qr[a, c]
                    for t in range(nt):
                        p[a, t] += qc * tile[c, t]
        else:
            scores(tw, kbits, kgroup, nt, gs, gz, qr, qz, p)
        for a in range(g):
            m = top[a]
            for t in range(nt):
                m = max(m, p[a, t])
            rescale = np.exp(top[a] - m)
            total[a] *= rescale
            for c in range(dim):
                acc[a, c] *= rescale
            top[a] = m
            total[a] += exp_into(p[a], m, nt)
        dequant(tw, kwords, vbits, vgroup, nt, gs, gz, tile)
        for a in range(g):
            for c in range(dim):
                y = np.float32(0)
                for t in range(nt):
                    y += p[a, t] * tile[c, t]
                acc[a, c] += y
    for a in range(g):  # the own token, un-rotate, normalise
        m = max(top[a], own[a])
        rescale, po = np.exp(top[a] - m), np.exp(own[a] - m)
        norm = np.float32(1) / (total[a] * rescale + po)
        for i in range(dim):
            x[i] = po * own_v[i]
        for c in range(dim):
            w = acc[a, c] * rescale
            for i in range(dim):
                x[i] += w * hvt[c, i]
        for i in range(dim):
            x[i] *= norm
        narrow(x, out[r, h * g + a])


@numba.njit(parallel=True, cache=True, fastmath=True)
def decode(cache, geo, table, past, rows, q, k_own, v_own, out, hk, hvt, scale, kbits, kgroup, vbits, vgroup,
           kwords):
    """Every (sequence, KV head) job of a step; the arguments as ``kernel.decode`` passes them."""
    for j in numba.prange(table.shape[0] * k_own.shape[1]):
        job(cache, geo, table, past, rows, q, k_own, v_own, out, hk, hvt, scale, j, kbits, kgroup, vbits, vgroup,
            kwords, q.shape[2])
