"""The reductions of the compiled CPU decode step (numba; imported only where numba is).

``merge_chunks`` combines the (row, chunk) jobs of one segment (flash-decoding's split-K reduction);
``finish`` attends on the full-precision tail (residual and own tokens), merges every segment's part
and un-rotates the values once, writing the layer's output in the model's layout.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(fastmath=True)
def merge_chunks(m_out, l_out, acc, accp, vorder, rowlist, top, l, stored, plain):
    """The jobs' partials of each row merged (flash-decoding's reduction) into the rows ``rowlist`` of
    the outputs, values back to channel order."""
    rows, chunks, nq, d = acc.shape
    for ri in range(rows):
        r = rowlist[ri]
        for j in range(nq):
            mx = np.float32(-1e30)
            for c in range(chunks):
                mx = max(mx, m_out[ri, c, j])
            tot = np.float32(0.0)
            for m in range(d):
                stored[r, j, vorder[m]] = 0.0
                plain[r, j, m] = 0.0
            for c in range(chunks):
                w = np.exp(m_out[ri, c, j] - mx)
                tot += l_out[ri, c, j] * w
                for m in range(d):
                    stored[r, j, vorder[m]] += acc[ri, c, j, m] * w
                    plain[r, j, m] += accp[ri, c, j, m] * w
            top[r, j, 0] = mx if mx > -1e29 else 0.0  # nothing seen: a finite max, zero weight
            l[r, j, 0] = tot


@njit(fastmath=True)
def finish(q, res_k, res_v, own_k, own_v, cols, has_mask, ql, heads, top, l, stored, plain, rotated, unrot, out):
    """The last step of a decoding forward: attention on the full-precision tail (the residual, every
    token visible) and the forward's own tokens (causal among themselves; or the mask's columns,
    which run over both), merged with every segment's part (flash-decoding's reduction), values
    stored rotated un-rotated once (``@ unrot``), normalised and written in the model's layout
    ``out`` (batch, q_len, q_heads, dim)."""
    rows, nq, d = q.shape
    parts, n_res, n_own = top.shape[0], res_k.shape[1], own_k.shape[1]
    group = nq // ql
    s = np.empty(n_res + n_own, np.float32)
    vp = np.empty(d, np.float32)
    vr = np.empty(d, np.float32)
    for r in range(rows):
        bi, h = r // heads, r % heads
        for j in range(nq):
            g, qi = j // ql, j % ql
            mx = np.float32(-np.inf)
            for t in range(n_res + n_own):
                if has_mask:
                    seen = cols[bi, qi, t]
                else:
                    seen = t < n_res or t - n_res <= qi + n_own - ql
                x = np.float32(-np.inf)
                if seen:
                    k = res_k[r, t] if t < n_res else own_k[r, t - n_res]
                    x = np.float32(0.0)
                    for m in range(d):
                        x += q[r, j, m] * k[m]
                s[t] = x
                mx = max(mx, x)
            for i in range(parts):
                if l[i, r, j, 0] > 0:
                    mx = max(mx, top[i, r, j, 0])
            tot = np.float32(0.0)
            for m in range(d):
                vp[m] = 0.0
                vr[m] = 0.0
            if mx > -np.inf:
                for t in range(n_res + n_own):
                    if s[t] > -np.inf:
                        w = np.exp(s[t] - mx)
                        tot += w
                        v = res_v[r, t] if t < n_res else own_v[r, t - n_res]
                        for m in range(d):
                            vp[m] += w * v[m]
                for i in range(parts):
                    if l[i, r, j, 0] > 0:
                        w = np.exp(top[i, r, j, 0] - mx)
                        tot += w * l[i, r, j, 0]
                        acc = vr if rotated[i] else vp
                        for m in range(d):
                            acc[m] += w * stored[i, r, j, m]
                            vp[m] += w * plain[i, r, j, m]
            inv = np.float32(1.0) / tot if tot > 0 else np.float32(0.0)
            o = out[bi, qi, h * group + g]
            for c in range(d):
                o[c] = vp[c]
            for m in range(d):
                x = vr[m]
                u = unrot[m]
                for c in range(d):
                    o[c] += x * u[c]
            for c in range(d):
                o[c] *= inv
