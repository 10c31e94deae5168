"""Attention on the compressed segments themselves: the history is never materialised.

Per segment, keys are read in their stored domain and the transforms move to the query or the
output instead: a Hadamard-rotated key needs the query rotated once, ``(q H)·(k H) = q·k``; rotated
values need the output un-rotated once, ``(Σ p ṽ) Hᵀ``. Sparse outliers correct the scores and
outputs at their own coordinates. Segments (and blocks of a long segment in chunked prefill) are
merged with an online softmax. In decoding on the CPU, compiled code runs the whole step
(:func:`streamkv.kv.attention.cpu.decode`: each packed segment read in one pass, scores, softmax and
values together, keys stored before RoPE un-rotated and rotated inside it; then the residual, the own
tokens and the merge); everything else is a few tensor ops per block.

On the tensor path, keys stored before RoPE cannot move their rotation to the query (RoPE differs per
position): such a block is dequantized, un-rotated and rotated by RoPE like the dense reader does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..storage.sparse import SparseOutliers
from ..transforms.hadamard import hadamard_on
from . import cpu
from .online_softmax import Partial, merge_all
from .view import DECODE_QUERIES, KVSegment, LayerView

NEG_INF = float("-inf")


@dataclass
class FusedBackend:
    """Segment-wise attention with an online softmax; see the module docstring.

    ``block_tokens``: history tokens per block when many queries attend (chunked prefill), so the
    scores of one block fit in cache. ``decode_queries``: up to this many queries per KV head a
    forward counts as decoding and reads each segment in one pass (with the CPU kernel when it applies).
    """

    block_tokens: int = 1024
    decode_queries: int = DECODE_QUERIES
    cpu_kernel: bool = True

    name = "fused"
    materializes = False

    def check(self, compression, device: torch.device) -> None:
        """Serves every storage of the engine on every device."""

    def attend(self, view: LayerView, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """``query`` (batch, q_heads, q_len, dim) → output (batch, q_len, q_heads, dim)."""
        gq = view.grouping(query)
        decoding = view.is_decoding(query, self.decode_queries)
        kernel = decoding and self.cpu_kernel and query.device.type == "cpu" and cpu.available()
        if kernel and cpu.decodes(view):
            return cpu.decode(view, query, mask, scaling)
        q = gq.rows_of(query * scaling)
        rot = hadamard_on(gq.dim, q.device, q.dtype) if any(s.key_hadamard or s.value_hadamard for s in view.segments) else None
        qs = _Queries(q, None if rot is None else q @ rot, rot, mask, view, gq, decoding, kernel)
        parts = [self._segment(seg, qs) for seg in view.segments]
        parts.append(self._own(view, qs))
        plain, rotated = merge_all(parts).output()
        out = plain if rotated is None else (rotated @ rot.float().T if plain is None else plain + rotated @ rot.float().T)
        return gq.output(out, query.dtype)

    # -- one segment ------------------------------------------------------------------------------
    def _segment(self, seg: KVSegment, qs: "_Queries") -> Partial:
        if qs.decoding:
            return self._block(seg, seg.read_from, seg.tokens, qs)
        unit = seg.unit
        step = max(unit, self.block_tokens // unit * unit)
        return merge_all([self._block(seg, t0, min(seg.tokens, t0 + step), qs) for t0 in range(seg.read_from, seg.tokens, step)])

    def _block(self, seg: KVSegment, t0: int, t1: int, qs: "_Queries") -> Partial:
        if qs.kernel and cpu.covers(seg, qs.q.shape[0]):
            return cpu.attend(seg, t0, t1, qs)
        scores = _scores(seg, t0, t1, qs)
        if seg.skip > t0:
            scores[..., : seg.skip - t0] = NEG_INF
        qs.apply_mask(scores, seg.start + t0)
        part, p = Partial.of(scores)
        part.acc = _values(seg, t0, t1, p, qs)
        return part

    def _own(self, view: LayerView, qs: "_Queries") -> Partial:
        """This forward's own tokens, full precision, causal among themselves."""
        scores = (qs.q @ view.keys.transpose(1, 2)).float()
        start = view.history
        if qs.mask is not None:
            qs.apply_mask(scores, start)
        elif qs.ql > 1:  # no mask given: plain causal attention within the chunk
            i = torch.arange(qs.ql, device=scores.device)
            causal = (i[:, None] >= i[None, :]).repeat(qs.nq // qs.ql, 1)
            scores.masked_fill_(~causal, NEG_INF)
        part, p = Partial.of(scores)
        part.acc = [(p.to(view.values.dtype) @ view.values).float(), None]
        return part


class _Queries:
    """The query of one forward in the layouts the segments need, and its mask."""

    def __init__(self, q, q_rot, rot, mask, view: LayerView, gq, decoding: bool, kernel: bool):
        self.q, self.q_rot, self.rot, self.ql, self.group = q, q_rot, rot, gq.q_len, gq.group
        self.nq = gq.nq
        self.mask, self.view = mask, view
        self.decoding = decoding  # a decoding step: each segment read in one pass
        self.kernel = kernel  # ... by the compiled CPU kernel where it covers the segment
        self.sparse: dict[int, tuple] = {}  # outlier coordinates, decoded once per forward

    def apply_mask(self, scores: torch.Tensor, position: int) -> None:
        """Mask ``scores`` (rows, nq, tokens) whose first column is the key at ``position``."""
        if self.mask is None:
            return
        m = self.view.columns(self.mask, position, scores.shape[-1])  # (batch, 1, q_len, tokens), True = attend
        b = m.shape[0]
        m = m.unsqueeze(2).expand(b, self.view.heads, self.group, self.ql, m.shape[-1])
        scores.masked_fill_(~m.reshape(scores.shape), NEG_INF)

    def outliers(self, sparse: SparseOutliers, t0: int, t1: int, dtype) -> tuple:
        """(row, token - t0, channel, value) of the outliers in tokens ``[t0, t1)``."""
        key = id(sparse)
        if key not in self.sparse:
            self.sparse[key] = (*sparse.coordinates(), sparse.decoded_values(dtype))
        r, t, c, v = self.sparse[key]
        if r.device.type == "cpu":  # exact selection; on a GPU it would wait for the device
            lo, hi = torch.searchsorted(t, torch.tensor([t0, t1])).tolist()
            return r[lo:hi], t[lo:hi] - t0, c[lo:hi], v[lo:hi]
        inside = (t >= t0) & (t < t1)  # no host synchronisation: outside ones add zero at a clamped place
        return r, (t - t0).clamp(0, t1 - t0 - 1), c, v * inside


def _scores(seg: KVSegment, t0: int, t1: int, qs: _Queries) -> torch.Tensor:
    """Scores of the block's keys in the query's domain, outliers included: (rows, nq, t1 - t0)."""
    k = seg.keys.slice_tokens(t0, t1).dequantize(qs.q.dtype)
    sparse = seg.key_outliers
    if seg.key_rope is not None:  # pre-RoPE keys: back to the model's domain, like the dense reader
        if seg.key_hadamard:
            k = k @ qs.rot.T
        if sparse is not None:
            _add(k, qs.outliers(sparse, t0, t1, k.dtype))
        seg.key_rope.rotate_(k, seg.start + t0)
        return (qs.q @ k.transpose(1, 2)).float()
    if not seg.key_hadamard:
        if sparse is not None:
            _add(k, qs.outliers(sparse, t0, t1, k.dtype))
        return (qs.q @ k.transpose(1, 2)).float()
    scores = (qs.q_rot @ k.transpose(1, 2)).float()
    if sparse is not None:
        add_key_outliers(scores, qs.q, qs.outliers(sparse, t0, t1, qs.q.dtype))
    return scores


def _values(seg: KVSegment, t0: int, t1: int, p: torch.Tensor, qs: _Queries) -> list:
    """The block's unnormalised outputs ``p @ v``: [plain domain, rotated domain]."""
    v = seg.values.slice_tokens(t0, t1).dequantize(qs.q.dtype)
    sparse = seg.value_outliers
    if not seg.value_hadamard:
        if sparse is not None:
            _add(v, qs.outliers(sparse, t0, t1, v.dtype))
        return [(p.to(v.dtype) @ v).float(), None]
    rotated = (p.to(v.dtype) @ v).float()
    plain = None
    if sparse is not None:
        plain = torch.zeros_like(rotated)
        add_value_outliers(plain, p, qs.outliers(sparse, t0, t1, torch.float32))
    return [plain, rotated]


def _add(dense: torch.Tensor, outliers: tuple) -> None:
    r, t, c, v = outliers
    dense.index_put_((r, t, c), v.to(dense.dtype), accumulate=True)


def add_key_outliers(scores: torch.Tensor, q: torch.Tensor, outliers: tuple) -> None:
    """``scores[r, :, t] += q[r, :, c] * value`` for each outlier."""
    r, t, c, v = outliers
    scores.transpose(1, 2).index_put_((r, t), (q[r, :, c] * v.to(q.dtype)[:, None]).float(), accumulate=True)


def add_value_outliers(acc: torch.Tensor, p: torch.Tensor, outliers: tuple) -> None:
    """``acc[r, :, c] += p[r, :, t] * value`` for each outlier."""
    r, t, c, v = outliers
    acc.transpose(1, 2).index_put_((r, c), p[r, :, t] * v.float()[:, None], accumulate=True)
