"""One layer of the compressed cache: how a chunk's keys and values are stored as they arrive.

Each layer keeps, per tensor kind (keys, values), in sequence order:

1. **body** - packed b-bit groups from the quantizer, aligned to absolute positions, with the
   outliers found by the detector moved into sparse storage so that they neither widen their group
   nor lose precision;
2. **sinks** - a higher-precision copy (sink bit width, or fp16) of the first ``sink.size`` tokens,
   which supersedes them in the body;
3. **residual** - tokens not yet compressed, at full precision: the tail of a chunk that does not
   fill a key group, KIVI's recent window, or the tokens of decoding until a group is full.

``update`` is called once per layer per forward (one prefill chunk, or one decoded token). It
exposes the history as a :class:`~streamkv.kv.segments.LayerView` (the read contract), then
compresses the new tokens; only the compressed form is kept. A backend that ``materializes`` gets
the dense history followed by the new tokens, as transformers' own layers return it.

A sliding-window layer (``window``) keeps only what a later query can still attend to: compressed
groups that fall wholly out of the window are freed with their sinks and outliers (uncompressed, the
residual keeps the last ``window - 1`` tokens, as transformers' ``DynamicSlidingWindowLayer`` does).
Positions stay absolute: segments start where their tokens are, and ``get_mask_sizes`` reports the
held tokens and the first one's position, so transformers' sliding mask lines up with them.
"""

from __future__ import annotations

from copy import copy
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .attention.interface import carry
from .attention.view import KVSegment, LayerView
from .compression import Compression
from .storage.composite import compact
from .storage.packed import encode
from .storage.raw import Raw
from .storage.sparse import SparseOutliers
from .transforms.rope import RopeTable


class _Stream:
    """The store of one tensor kind (keys or values) of one layer."""

    def __init__(self, rows: int, dim: int, outlier_bits: int | None):
        self.sinks: Any = None
        self.body: Any = None
        self.outliers = SparseOutliers(outlier_bits, rows, dim) if outlier_bits else None
        self.residual: torch.Tensor | None = None
        self.detector_state: Any = None

    def parts(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor held, by category (for honest byte counts)."""
        out = {"sinks": [], "body": [], "outliers": [], "residual": []}
        if self.sinks is not None:
            out["sinks"] = self.sinks.tensors()
        if self.body is not None:
            out["body"] = self.body.tensors()
        if self.outliers is not None:
            out["outliers"] = self.outliers.tensors()
        if self.residual is not None:
            out["residual"] = [self.residual]
        return out


class CompressedLayer(CacheLayerMixin):
    """One layer's compressed keys and values; see the module docstring."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, compression: Compression, index: int = 0, rope: RopeTable | None = None, backend: Any = None,
                 quantize_own_chunk: bool = False, window: int | None = None):
        super().__init__()
        self.c = compression
        self.index = index
        self.rope = rope if compression.enabled and compression.quantizer.pre_rope else None
        self.backend = backend
        self.quantize_own_chunk = quantize_own_chunk
        self.window = window  # a sliding-window layer: a query at p sees keys at p - window + 1 .. p
        self.is_sliding = window is not None
        self.seen = 0  # tokens received; also the next token's position
        self.start = 0  # position of the first token held (a sliding layer frees what no query can see)
        self.compressing = True  # False: new tokens stay at full precision (the question after a compressed context)

    # -- transformers' layer protocol -------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.batch, self.heads, self.dim = b, h, d
        self.rows = b * h
        self.dtype, self.device = key_states.dtype, key_states.device
        out = self.c.outlier if self.c.enabled and self.c.outlier.enabled else None
        self.k = _Stream(self.rows, d, out.key_bits if out is not None and out.keys else None)
        self.v = _Stream(self.rows, d, out.value_bits if out is not None and out.values else None)
        for s in (self.k, self.v):
            s.residual = key_states.new_empty(self.rows, 0, d)
            s.detector_state = out.new_state() if out is not None else None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, d = key_states.shape
        k = key_states.reshape(self.rows, t, d)
        v = value_states.reshape(self.rows, t, d)
        if self.quantize_own_chunk:  # simulated protocol: the chunk also sees its own compressed K/V
            self._append(k, v)
            out = self.view(k[:, :0], v[:, :0]).dense()
            self._evict()
            return out
        view = self.view(k, v)
        if self.backend is None or self.backend.materializes:
            out = view.dense()
            self._append(k, v)
            self._evict()
            return out
        self._append(k, v)  # the view holds the history as it was: appending and evicting replace, never mutate, its tensors
        self._evict()
        return carry(key_states, view), value_states

    def view(self, k: torch.Tensor, v: torch.Tensor) -> LayerView:
        """The read contract: the stored history as segments, then this forward's ``k``/``v``."""
        segments = []
        if self.k.body is not None:
            n_sinks = 0 if self.k.sinks is None else self.k.sinks.tokens
            segments.append(KVSegment.of(self.start, self.k.body, self.v.body, skip=n_sinks, key_rope=self.rope,
                                         key_outliers=copy(self.k.outliers), value_outliers=copy(self.v.outliers)))
        if self.k.sinks is not None:
            segments.append(KVSegment.of(self.start, self.k.sinks, self.v.sinks, key_rope=self.rope))
        if self.k.residual.shape[1]:
            segments.append(KVSegment(self.start + self.body_tokens, Raw(self.k.residual), Raw(self.v.residual)))
        return LayerView(segments, k, v, self.batch, self.heads, backend=self.backend, mask_offset=self.start, layer=self.index)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): the held tokens and this forward's, from the first held position."""
        return self.seen - self.start + query_length, self.start

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    @property
    def held_tokens(self) -> int:
        """Tokens the layer holds (all it has seen, or a sliding layer's window and the group it is in)."""
        return self.seen - self.start

    def reset(self) -> None:
        self.is_initialized = False
        self.seen = 0
        self.start = 0
        self.compressing = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the compressed cache does not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the compressed cache cannot be cropped (compressed groups are not undoable)")

    # -- storage ----------------------------------------------------------------------------------
    @property
    def body_tokens(self) -> int:
        return 0 if self.k.body is None else self.k.body.tokens

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.residual = torch.cat([self.k.residual, k], 1)
        self.v.residual = torch.cat([self.v.residual, v], 1)
        self.seen += k.shape[1]
        if not self.c.enabled or not self.compressing:
            return
        q = self.c.quantizer
        pending = self.k.residual.shape[1] - q.residual_length
        n = (pending // q.token_block) * q.token_block if pending > 0 else 0
        if n:
            start = self.start + self.body_tokens  # the block's first position
            kb, vb = self.k.residual[:, :n], self.v.residual[:, :n]
            self.k.residual, self.v.residual = self.k.residual[:, n:], self.v.residual[:, n:]
            if self.rope is not None:
                kb = self.rope.unrotate(kb, start)
            n_sink = min(max(self.c.sink.size - start, 0), n)
            self._compress(self.k, kb, q.encode_keys, n_sink, self.c.sink.key_bits)
            self._compress(self.v, vb, q.encode_values, n_sink, self.c.sink.value_bits)

    def _evict(self) -> None:
        """A sliding layer frees the groups (with their sinks and outliers) that no later query can see."""
        if self.window is None:
            return
        first = self.seen - self.window + 1  # the earliest position the next query attends to
        if not self.c.enabled:  # everything is residual: keep the last window - 1 tokens, like transformers
            n = first - self.start
            if n > 0:
                self.k.residual, self.v.residual = self.k.residual[:, n:].clone(), self.v.residual[:, n:].clone()
                self.start += n
            return
        block = self.c.quantizer.token_block
        n = min((first - self.start) // block * block, self.body_tokens)  # whole groups only
        if n <= 0:
            return
        for s in (self.k, self.v):
            s.body = compact(s.body.slice_tokens(n, s.body.tokens)) if n < s.body.tokens else None
            if s.sinks is not None:
                s.sinks = compact(s.sinks.slice_tokens(n, s.sinks.tokens)) if n < s.sinks.tokens else None
            if s.outliers is not None:
                s.outliers.drop_tokens(n)
        self.start += n

    def _compress(self, s: _Stream, x: torch.Tensor, encoder, n_sink: int, sink_bits: int) -> None:
        """Compress a block of whole groups whose first ``n_sink`` tokens are attention sinks.

        Sinks keep their own higher-precision copy; inside the groups they are excluded from the range
        (like outliers) so the groups stay aligned to absolute positions, and they take no part in the
        outlier statistics, whose scale they would distort.
        """
        exclude = None
        if n_sink:
            sinks = encode(x[:, :n_sink], sink_bits, "token", self.dim)
            s.sinks = sinks if s.sinks is None else s.sinks.append(sinks)
            exclude = torch.zeros_like(x, dtype=torch.bool)
            exclude[:, :n_sink] = True
        mask = None
        if s.outliers is not None:
            mask = torch.zeros_like(x, dtype=torch.bool)
            if n_sink < x.shape[1]:
                mask[:, n_sink:] = self.c.outlier.detect(x[:, n_sink:], s.detector_state)
            exclude = mask if exclude is None else exclude | mask
        enc = encoder(x, exclude, layer=self.index)
        if mask is not None:  # an outlier stores what it adds to its group's reading, so every reader adds
            s.outliers.append(x - enc.dequantize(x.dtype), mask)
        s.body = enc if s.body is None else s.body.append(enc)

    # -- accounting -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Bytes of every tensor held and elements represented, per kind and category."""
        out: dict[str, Any] = {}
        for kind, s in (("key", self.k), ("value", self.v)):
            by_cat = {cat: sum(t.nbytes for t in ts) for cat, ts in s.parts().items()}
            out[kind] = {
                "bytes": sum(by_cat.values()),
                "bytes_by_part": by_cat,
                "elements": self.rows * self.held_tokens * self.dim,
                "outliers": 0 if s.outliers is None else s.outliers.count,
            }
        return out
