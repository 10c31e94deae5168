"""The encode side of Lloyd-Max groups with ``scale=mse``, compiled (numba, where it is installed).

Why compiled: the search tries every candidate scale on every group, and in torch each try is a
``bucketize`` and a gather over the whole chunk (single-threaded, a pass per candidate), which made
encoding the largest part of a compressed prefill. Here one parallel pass per group computes the RMS,
tries the candidates, keeps the first with the least squared error (as the torch reference does),
then writes the codes and the two sums the ``projection`` reconstruction needs. Scales are one byte
(``log8``); the stored candidates and decoded scales are the reference's own (tables from
:mod:`.codebook`), so the only difference from it is float summation order.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..kernels import compiled_cpu


def available() -> bool:
    return compiled_cpu()


@lru_cache(maxsize=1)
def _kernel():
    from numba import njit, prange

    from ..kernels.disk_cache import on_disk

    f32 = np.float32

    @njit(inline="always")
    def bucket(u, cuts, k):  # k[j] = torch.bucketize(u[j], cuts): how many cuts lie below u[j]
        k[:] = 0
        for c in range(cuts.shape[0]):  # cuts outside: the inner loop over the group vectorises
            cut = cuts[c]
            for j in range(u.shape[0]):
                k[j] += u[j] > cut

    @njit(parallel=True)
    def search(d, w, levels, cuts, grid, steps, bias, decoded, codes, stored, dd_out, dc_out):
        groups, size = d.shape
        per = 64  # groups per job: the scratch is made once per job
        for job in prange((groups + per - 1) // per):
            u, k, best_k = np.empty(size, f32), np.empty(size, np.int32), np.empty(size, np.int32)
            for gi in range(job * per, min(groups, (job + 1) * per)):
                x, wi = d[gi], w[gi]
                ss, n = f32(0.0), f32(0.0)
                for j in range(size):
                    ss += x[j] * x[j] * wi[j]
                    n += wi[j]
                rms = np.sqrt(ss / max(n, f32(1.0)))
                best, best_err, last = 0, f32(np.inf), -1
                for m in range(grid.shape[0]):
                    s = max(rms * grid[m], f32(2.0**-30))
                    code = int(min(max(np.rint(np.log2(s) * steps) + bias, 0.0), 255.0))
                    if code == last:  # the same stored scale as the candidate before: the same error
                        continue
                    last = code
                    scale = decoded[code]
                    for j in range(size):
                        u[j] = x[j] / scale
                    bucket(u, cuts, k)
                    err = f32(0.0)
                    for j in range(size):
                        e = x[j] - levels[k[j]] * scale
                        err += e * e * wi[j]
                    if err < best_err:
                        best, best_err = code, err
                        best_k[:] = k
                if best_err == np.inf:  # no finite error (not finite input): the reference's first code
                    for j in range(size):
                        u[j] = x[j] / decoded[0]
                    bucket(u, cuts, best_k)
                dd, dc = f32(0.0), f32(0.0)
                for j in range(size):
                    codes[gi, j] = best_k[j]
                    dd += x[j] * x[j] * wi[j]
                    dc += x[j] * levels[best_k[j]] * wi[j]
                stored[gi] = best
                dd_out[gi] = dd
                dc_out[gi] = dc

    return on_disk(search, ("scale_search",), (__file__,))


def search_scales(d: torch.Tensor, w: torch.Tensor | None, levels: torch.Tensor, cuts: torch.Tensor,
                  grid: tuple[float, ...], steps: int, bias: int, decoded: torch.Tensor):
    """For groups along the last dim of ``d`` (float32, CPU): ``(codes uint8, log8 scale codes uint8,
    sum(d*d), sum(d*level))`` with ``w`` (0/1 weights, or None) leaving values out of every sum; shapes
    as ``d`` and ``d[..., :1]``."""
    shape = d.shape
    flat = d.reshape(-1, shape[-1]).contiguous()
    weights = (torch.ones_like(flat) if w is None else w.expand(shape).reshape(flat.shape).contiguous()).numpy()
    groups = flat.shape[0]
    codes = np.empty(flat.shape, dtype=np.uint8)
    stored = np.empty(groups, dtype=np.uint8)
    dd, dc = np.empty(groups, dtype=np.float32), np.empty(groups, dtype=np.float32)
    _kernel()(flat.numpy(), weights, levels.float().contiguous().numpy(), cuts.float().contiguous().numpy(),
              np.asarray(grid, dtype=np.float32), np.float32(steps), np.float32(bias),
              decoded.float().contiguous().numpy(), codes, stored, dd, dc)
    side = (*shape[:-1], 1)
    return (torch.from_numpy(codes).view(shape), torch.from_numpy(stored).view(side),
            torch.from_numpy(dd).view(side), torch.from_numpy(dc).view(side))
