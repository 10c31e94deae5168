"""What the Triton kernels get to read, planned on the host (:mod:`.triton` launches them): which
segment is the packed body read in the kernel and which small full-precision pieces go beside it, a
stored block as the kernel's arguments, and the sparse outliers as per-(row, tile) lists built on the
device once per version of the outlier store (no host synchronisation)."""

from __future__ import annotations

import torch

from ..storage.packed import Quantized
from ..storage.packing import WIDTHS
from ..storage.raw import Raw
from .view import KVSegment, LayerView


class _Block(tuple):
    """A stored block as the kernel's arguments: (codes, scale, zero, lut, 4 strides) + constexprs."""

    bits: int
    axis: int
    group: int
    lut: bool


def block_args(block: Quantized | None, dummy: torch.Tensor) -> _Block:
    if block is None:
        out = _Block((dummy, dummy, dummy, dummy, 0, 0, 0, 0))
        out.bits, out.axis, out.group, out.lut = 8, 1, 1, False
        return out
    codes = block.codes
    scale = block.scale if block.scale.is_floating_point() else block.derived.setdefault("scale", block.scale_values(torch.float32))
    scale = scale.reshape(scale.shape[0], scale.shape[1], -1)
    zero = block.zero.reshape(scale.shape) if block.has_zero else block.derived.setdefault("zero", torch.zeros_like(scale))
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    if scale.stride(-1) != 1 or zero.stride() != scale.stride():
        scale, zero = scale.contiguous(), zero.contiguous()
    lut = block.lut
    out = _Block((codes, scale, zero, dummy if lut is None else lut.to(codes.device, torch.float32),
                  codes.stride(0), codes.stride(1), scale.stride(0), scale.stride(1)))
    out.bits, out.axis, out.group, out.lut = block.bits, 0 if block.axis == "channel" else 1, block.group_size, lut is not None
    return out


def _covered(block, dim: int) -> bool:
    return isinstance(block, Quantized) and block.bits in WIDTHS and block.dim == dim


def plan(view: LayerView, query: torch.Tensor):
    """(body segment or None, [(keys, values, position)] full-precision pieces, own tokens last), or
    None when a segment needs the ``fused`` backend."""
    d = query.shape[-1]
    packed = [s for s in view.segments if _covered(s.keys, d) and _covered(s.values, d)]
    body = max(packed, key=lambda s: s.tokens, default=None)
    pieces = []
    for seg in view.segments:
        if seg is body or seg.tokens <= seg.skip:
            continue
        if seg.plain:
            k, v = seg.keys.data, seg.values.data
        elif isinstance(seg.keys, (Quantized, Raw)) and isinstance(seg.values, (Quantized, Raw)):
            k, v = _dense(seg, query.dtype)  # small (sinks): read once with the reference reader, cached
        else:
            return None
        pieces.append((_last_dim_contiguous(k[:, seg.skip :]), _last_dim_contiguous(v[:, seg.skip :]), seg.start + seg.skip))
    if len(pieces) > 2:
        return None
    dummy = query.new_empty(view.keys.shape[0], 0, d)
    pieces = [(dummy, dummy, 0)] * (2 - len(pieces)) + pieces
    pieces.append((_last_dim_contiguous(view.keys), _last_dim_contiguous(view.values), view.history))
    return body, pieces


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _dense(seg: KVSegment, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The segment read densely by the reference reader, once, held by its stored keys."""
    cache = seg.keys.derived
    key = ("triton-dense", dtype, seg.start)
    if key not in cache:
        rows = seg.keys.tensors()[0].shape[0]
        out = []
        for kind in ("keys", "values"):
            buf = torch.empty(rows, seg.tokens, seg.values.dim, dtype=dtype, device=seg.keys.device)
            seg.read(kind, dtype, buf)
            out.append(buf)
        cache[key] = tuple(out)
    return cache[key]


def outlier_lists(seg: KVSegment, kind: str, rows: int, bn: int, cos: torch.Tensor, sin: torch.Tensor, width: int):
    """The segment's ``kind`` outliers as per-(row, tile) lists: (pointers (rows, tiles + 1) int32,
    token within the tile int16, channel int16, coefficient a float32, coefficient b float32) sorted by
    (row, token). An outlier δ adds to its body value (un-rotated, pre-RoPE). Keys: a score bias
    ``q[c] a + q[partner(c)] b`` (a = δ, b = 0 without RoPE); values: ``p δ`` at channel c (δ = a).

    Built on the device with a stable sort and a search (no host synchronisation), once per version of
    the outlier store, and held by it."""
    sparse = seg.key_outliers if kind == "keys" else seg.value_outliers
    if sparse is None or sparse.count == 0:
        return None
    block = seg.keys if kind == "keys" else seg.values
    rope = kind == "keys" and seg.key_rope is not None
    return sparse.derived(("triton", kind, bn, block.tokens, seg.start, rope), lambda: _lists(seg, sparse, block, rope, rows, bn, cos, sin, width))


def _lists(seg, sparse, block, rope: bool, rows: int, bn: int, cos, sin, width: int):
    r, t, c = sparse.coordinates()
    delta = sparse.decoded_values(torch.float32)
    order = torch.sort(r, stable=True).indices  # stored token-major; stable by row gives (row, token)
    r, t, c, delta = r[order], t[order], c[order], delta[order]
    T = block.tokens
    tiles = -(-T // bn)
    edges = torch.arange(rows, device=r.device)[:, None] * T + (torch.arange(tiles + 1, device=r.device) * bn).clamp(max=T)
    ptr = torch.searchsorted(r * T + t, edges.reshape(-1)).to(torch.int32).reshape(rows, tiles + 1)
    a, b = delta, delta
    if rope:  # RoPE of δ e_c at position p: δ cos[p, c] at c, ±δ sin[p, partner] at partner(c) (c < width)
        h = width // 2
        pos = seg.start + t
        inside = c < width
        partner = torch.where(c < h, c + h, torch.where(inside, c - h, c)).clamp(max=width - 1)
        a = torch.where(inside, delta * cos[pos, c.clamp(max=width - 1)], delta)
        b = torch.where(inside, torch.where(c < h, delta, -delta) * sin[pos, partner], torch.zeros_like(delta))
    return ptr, (t % bn).to(torch.int16), c.to(torch.int16), a.float().contiguous(), b.float().contiguous()
