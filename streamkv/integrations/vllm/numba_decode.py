"""The fused decode attention (numba), imported by ``kernel.py`` on the first decode step only (never at
import time: vLLM 0.32's CPU worker dies at start if numba is loaded; see ``kernel.py``).

Why: a decode step's query is one token, so writing the whole history out as bf16 pages for vLLM's
kernel (the read path) costs far more than the attention itself. Here one job per (sequence, KV head)
reads its packed slots once, page by page, for all the GQA query heads of that KV head:

* scores straight from the key codes: ``q·k = Σ_g scale_g (q_g·codes_g) + zero_g Σ q_g``;
* a softmax that is online across pages and exact within one (float32 throughout);
* values as ``Σ_t p_t scale_t codes_t`` plus ``Σ_t p_t zero_t`` per group, never dequantized;
* the step's own key and value last, at full precision (the chunked-prefill rule).

Everything stays in the Hadamard-rotated domain: the host rotates the query and un-rotates the output.
Every function is top-level (numba's on-disk cache); ``decode_<dim>_<kg>_<vg>`` are the presets'
layouts with their sizes as constants (short loops unroll, as in ``numba_read.py``), ``decode_any``
takes any layout.
"""

import numba
import numpy as np

from .numba_read import codes_of, half

jit = numba.njit(inline="always", cache=True)


@jit
def meta(slot, off, scales, zeros):  # the fp16 (scale, zero) of each group, from byte ``off``
    for gi in range(scales.shape[0]):
        m = off + 4 * gi
        scales[gi], zeros[gi] = half(slot[m], slot[m + 1]), half(slot[m + 2], slot[m + 3])


@jit
def job(cache, table, past, q, k_own, v_own, out, scale, j, kbits, kgroup, kcodes, vbits, vgroup, vcodes, kbytes,
        dim):
    """Sequence ``j // heads``, KV head ``j % heads``: ``out[s, its query heads]``, rotated."""
    heads, block = cache.shape[1], cache.shape[2]
    s, h, scale = j // heads, j % heads, np.float32(scale)
    g = q.shape[1] // heads  # query heads per KV head
    nkg, nvg = dim // kgroup, dim // vgroup
    qs = q[s, h * g:(h + 1) * g]  # (g, dim)
    qsum = np.zeros((g, nkg), np.float32)  # Σ q over each key group: the zeros' weights
    for a in range(g):
        for i in range(dim):
            qsum[a, i // kgroup] += qs[a, i]
    codes = np.empty(dim, np.float32)
    ks, kz = np.empty(nkg, np.float32), np.empty(nkg, np.float32)  # key scales and zeros of one token
    vs, vz = np.empty(nvg, np.float32), np.empty(nvg, np.float32)
    p = np.empty((g, block), np.float32)  # one page's scores, then its weights
    acc = np.zeros((g, dim), np.float32)  # Σ p scale codes
    zacc = np.zeros((g, nvg), np.float32)  # Σ p zero
    top = np.full(g, -np.inf, np.float32)  # running max
    total = np.zeros(g, np.float32)  # running Σ p
    n = past[s]
    for b0 in range(0, n, block):
        page, nt = table[s, b0 // block], min(block, n - b0)
        for t in range(nt):  # keys: scores from the codes
            slot = cache[page, h, t]
            codes_of(slot, 0, kbits, codes)
            meta(slot, kcodes, ks, kz)
            for a in range(g):
                x = np.float32(0)
                for gi in range(nkg):
                    dot = np.float32(0)
                    for i in range(gi * kgroup, (gi + 1) * kgroup):
                        dot += qs[a, i] * codes[i]
                    x += ks[gi] * dot + kz[gi] * qsum[a, gi]
                p[a, t] = x * scale
        for a in range(g):  # the page's softmax, rescaling what came before once
            m = max(top[a], p[a, :nt].max())
            c = np.exp(top[a] - m)
            total[a] *= c
            acc[a] *= c
            zacc[a] *= c
            top[a] = m
            for t in range(nt):
                p[a, t] = np.exp(p[a, t] - m)
                total[a] += p[a, t]
        for t in range(nt):  # values: weighted codes, weighted zeros
            slot = cache[page, h, t]
            codes_of(slot, kbytes, vbits, codes)
            meta(slot, kbytes + vcodes, vs, vz)
            for a in range(g):
                for gi in range(nvg):
                    w = p[a, t] * vs[gi]
                    zacc[a, gi] += p[a, t] * vz[gi]
                    for i in range(gi * vgroup, (gi + 1) * vgroup):
                        acc[a, i] += w * codes[i]
    for a in range(g):  # the own token, then normalise
        x = np.float32(0)
        for i in range(dim):
            x += qs[a, i] * k_own[s, h, i]
        x *= scale
        m = max(top[a], x)
        c, po = np.exp(top[a] - m), np.exp(x - m)
        norm = np.float32(1) / (total[a] * c + po)
        for i in range(dim):
            out[s, h * g + a, i] = ((acc[a, i] + zacc[a, i // vgroup]) * c + po * v_own[s, h, i]) * norm


@numba.njit(parallel=True, cache=True)
def decode_any(cache, table, past, q, k_own, v_own, out, scale, kbits, kgroup, kcodes, vbits, vgroup, vcodes, kbytes):
    for j in numba.prange(table.shape[0] * cache.shape[1]):
        job(cache, table, past, q, k_own, v_own, out, scale, j, kbits, kgroup, kcodes, vbits, vgroup, vcodes, kbytes,
            q.shape[2])


@numba.njit(parallel=True, cache=True)
def decode_64_16_64(cache, table, past, q, k_own, v_own, out, scale, kbits, kgroup, kcodes, vbits, vgroup, vcodes,
                    kbytes):
    for j in numba.prange(table.shape[0] * cache.shape[1]):
        job(cache, table, past, q, k_own, v_own, out, scale, j, kbits, 16, kcodes, vbits, 64, vcodes, kbytes, 64)


@numba.njit(parallel=True, cache=True)
def decode_64_32_64(cache, table, past, q, k_own, v_own, out, scale, kbits, kgroup, kcodes, vbits, vgroup, vcodes,
                    kbytes):
    for j in numba.prange(table.shape[0] * cache.shape[1]):
        job(cache, table, past, q, k_own, v_own, out, scale, j, kbits, 32, kcodes, vbits, 64, vcodes, kbytes, 64)


@numba.njit(parallel=True, cache=True)
def decode_128_16_64(cache, table, past, q, k_own, v_own, out, scale, kbits, kgroup, kcodes, vbits, vgroup, vcodes,
                     kbytes):
    for j in numba.prange(table.shape[0] * cache.shape[1]):
        job(cache, table, past, q, k_own, v_own, out, scale, j, kbits, 16, kcodes, vbits, 64, vcodes, kbytes, 128)


@numba.njit(parallel=True, cache=True)
def decode_128_32_64(cache, table, past, q, k_own, v_own, out, scale, kbits, kgroup, kcodes, vbits, vgroup, vcodes,
                     kbytes):
    for j in numba.prange(table.shape[0] * cache.shape[1]):
        job(cache, table, past, q, k_own, v_own, out, scale, j, kbits, 32, kcodes, vbits, 64, vcodes, kbytes, 128)


def decoder(dim: int, key_group: int, value_group: int):
    """The compiled decode attention for a slot layout."""
    return globals().get(f"decode_{dim}_{key_group}_{value_group}", decode_any)
