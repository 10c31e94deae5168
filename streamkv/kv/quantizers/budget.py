"""Mixed precision without calibration: key and value widths per layer and kv head chosen online under a
bit budget.

A :class:`BudgetAllocator` is the per-sequence quantizer of a ``lloyd_max`` quantizer with
``budget_bits`` (one per cache, from its ``for_stream``: :class:`~streamkv.kv.contracts.PerSequence`).
It is told each layer's index and keeps, per *unit* (layer x kind, x kv head with
``granularity=head``), a statistic of the stream: the energy of the block's deviations from their channel
means, ``E||x_t - mean||^2`` (keys before RoPE, as they are stored), smoothed across chunks. The
absolute error a b-bit group leaves is that energy times the codebook's relative distortion D(b); a
unit's importance is its energy relative to the mean of its kind, raised to ``sensitivity_power``
(measured on SmolLM2: the layers whose keys spread widest are the ones whose quantization moves the
attention most; value spreads carry little signal), and keys weigh ``kind_weight`` times values.

Each *round* (one chunk through every layer; it starts when layer 0's keys arrive) the allocator
solves ``min sum_u w_u D_u(b_u)`` over the widths with a greedy upgrade order (largest error drop per
extra bit first; D is convex in b, so this is the optimum on the lower hull) under the round's code
budget. That budget is what keeps the *realised* average on target: everything stored so far is
counted (its own codes and metadata exactly, from the bytes it produced; sinks and sparse outliers
estimated from the ``exclude`` masks: a sink element at 8 bits plus its token's fp16 scale and zero,
an outlier at an int16 position plus an int8 value), and the round may spend what keeps the running
average at ``budget_bits`` once its own tokens are in. The first round has no statistics yet: keys get
the higher width first. Everything is computed from the sequence itself, chunk by chunk.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import torch

from ..errors import check
from ..storage.composite import split_rows
from ..storage.levels import gaussian_mse
from ..storage.masks import any_set, kept_mean, whole_tokens

KINDS = ("key", "value")
_OUTLIER_BITS = 24  # int16 position + int8 value
_EMA = 0.5  # weight of the newest block in a unit's statistic


def relative_distortion(codebook: str, bits: int, group: int = 128) -> float:
    """Expected squared error of a b-bit group relative to the group's variance (Gaussian model).

    ``lloyd_max`` (projection reconstruction): D/(1-D) of the Lloyd-Max codebook. ``minmax``: a uniform
    grid over the group's range, about 2 c_G standard deviations for G Gaussian samples, so
    (2 c_G / (2^b - 1))^2 / 12.
    """
    if codebook == "lloyd_max":
        d = gaussian_mse(bits)
        return d / (1 - d)
    c = math.sqrt(2 * math.log(max(group, 2)))  # expected max of |G| Gaussians, roughly
    return (2 * c / ((1 << bits) - 1)) ** 2 / 12


def metadata_bits(q: Any, kind: str, head_dim: int) -> float:
    """Bits per element a group's scale and zero cost in the quantizer's format (no codes)."""
    axis = getattr(q, f"{kind}_axis")
    g = getattr(q, f"{kind}_group_size") or (head_dim if axis == "token" else 0)
    if getattr(q, f"{kind}_codebook") == "minmax":
        return 32 / g
    scale = 16 if q.scale_format == "fp16" else 8
    zero = 16 if getattr(q, f"{kind}_zero") == "mean" else 0
    return (scale + zero) / g


def check_budget(q: Any, head_dim: int | None = None) -> None:
    """A one-line error when ``budget_bits`` cannot be realised by the widths (with the metadata the
    format adds, once ``head_dim`` is known; sinks and outliers then need a little more)."""
    widths = sorted(q.widths)
    check(len(widths) >= 1, "quantizer.widths must name at least one width")
    b = q.budget_bits
    if q.edge_layers:  # how far edge layers move the reachable range depends on the model: check_edges
        return
    if head_dim is None:
        check(
            widths[0] < b <= widths[-1] + 1,
            f"quantizer.budget_bits={b} cannot be realised with quantizer.widths={widths}; "
            f"allowed: more than {widths[0]} and at most about {widths[-1]} plus the metadata",
        )
        return
    meta = sum(metadata_bits(q, k, head_dim) for k in KINDS) / 2
    lo, hi = widths[0] + meta, widths[-1] + meta
    check(
        lo <= b <= hi,
        f"quantizer.budget_bits={b} cannot be realised with quantizer.widths={widths} and this format "
        f"({meta:.3f} bits of scales/zeros per element): allowed {lo:.3f} to {hi:.3f} (plus sinks and outliers)",
    )


def check_edges(q: Any, num_layers: int) -> None:
    """A one-line error when the budget, with the edge layers at their width, leaves the other layers
    less than their lowest width or more than their highest (before scales, sinks and outliers)."""
    edges = sum(q.is_edge(layer, num_layers) for layer in range(num_layers))
    if not edges:
        return
    check(edges < num_layers, f"quantizer.edge_layers={q.edge_layers} keeps all {num_layers} layers at edge_bits; nothing is left to budget")
    share, widths = edges / num_layers, sorted(q.widths)
    lo, hi = (share * q.edge_bits + (1 - share) * w for w in (widths[0], widths[-1] + 1))
    check(
        lo <= q.budget_bits <= hi,
        f"quantizer.budget_bits={q.budget_bits} cannot be met with quantizer.edge_layers={q.edge_layers} at "
        f"edge_bits={q.edge_bits} ({edges} of {num_layers} layers): allowed about {lo:.2f} to {hi:.2f} with the other "
        f"layers at {widths[0]} to {widths[-1]} bits plus scales; change the budget or edge_layers/edge_bits",
    )


Unit = tuple  # (kind, layer, row): row is a kv-head (x batch) index, or -1 for the whole layer


class BudgetAllocator:
    """The per-sequence encoder of a budgeted quantizer; see the module docstring."""

    def __init__(self, quantizer: Any, num_layers: int):
        self.q = quantizer
        self.num_layers = num_layers
        check_edges(quantizer, num_layers)
        self.widths = sorted(quantizer.widths)
        self.per_head = quantizer.granularity == "head"
        self.energy: dict[Unit, float] = {}  # unit -> smoothed deviation energy per token
        self.table: dict[Unit, int] = {}  # unit -> width for the current round
        self.body_bits = 0.0  # codes, scales and zeros produced so far (exact: their bytes)
        self.extras_bits = 0.0  # sinks and outliers sent elsewhere so far (estimated from the masks)
        self.elements = 0  # elements compressed so far
        self.rounds = 0
        self.code_target = float(self.widths[0])
        self.rows = 1
        self.history: list[dict] = []  # per round: target and realised mean code bits (for reports)
        self._dist = {
            k: {b: relative_distortion(getattr(quantizer, f"{k}_codebook"), b) for b in self.widths} for k in KINDS
        }

    # -- the Quantizer contract (geometry and checks are the budgeted quantizer's) ----------------------
    enabled = True

    @property
    def pre_rope(self) -> bool:
        return self.q.pre_rope

    @property
    def residual_length(self) -> int:
        return self.q.residual_length

    @property
    def token_block(self) -> int:
        return self.q.token_block

    def check_shapes(self, head_dim: int, chunk_size: int | None) -> None:
        self.q.check_shapes(head_dim, chunk_size)

    def encode_keys(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0):
        if layer == 0:
            self._new_round(x)
        return self._encode("key", x, exclude, layer)

    def encode_values(self, x: torch.Tensor, exclude: torch.Tensor | None = None, *, layer: int = 0):
        return self._encode("value", x, exclude, layer)

    def _units(self, kind: str, layer: int) -> list[Unit]:
        return [(kind, layer, r) for r in range(self.rows)] if self.per_head else [(kind, layer, -1)]

    def _edges(self) -> int:
        """Layers stored at the quantizer's ``edge_bits``, outside the allocation."""
        return sum(self.q.is_edge(layer, self.num_layers) for layer in range(self.num_layers))

    def _encode(self, kind: str, x: torch.Tensor, exclude: torch.Tensor | None, layer: int):
        if self.q.is_edge(layer, self.num_layers):  # paid for out of the budget, not allocated
            enc = self.q.encode_at(kind, x, exclude, self.q.edge_bits)
            self.body_bits += 8 * enc.nbytes
            self.elements += x.numel()
            return enc
        self._observe(kind, layer, x, exclude)
        widths = self._widths(kind, layer)
        if len(widths) == 1:
            enc = self.q.encode(kind, x, exclude, widths[0])
        else:
            pick = lambda t, rows: t if t is None or rows is None else t[rows]  # noqa: E731
            enc = split_rows(widths, lambda rows, b: self.q.encode(kind, pick(x, rows), pick(exclude, rows), b), x.shape[-1])
        self.body_bits += 8 * enc.nbytes
        self.extras_bits += self._extras_bits(x, exclude)
        self.elements += x.numel()
        return enc

    def _widths(self, kind: str, layer: int) -> list[int]:
        """The widths of this layer's units of ``kind`` (one, or one per row with ``granularity=head``)."""
        units = self._units(kind, layer)
        if self.rounds == 1 or any(u not in self.table for u in units):
            self._decide_causally(units)  # the first round: from the units seen so far
        return [self.table[u] for u in units]

    # -- statistics ---------------------------------------------------------------------------------
    def _observe(self, kind: str, layer: int, x: torch.Tensor, exclude: torch.Tensor | None) -> None:
        """Fold the block's deviation energy per token, ``E||x_t - mean||^2``, into each unit's statistic."""
        xf = x.float()
        if any_set(exclude):
            keep = (~exclude).float()
            dev = ((xf - kept_mean(xf, exclude)) * keep).square().sum((1, 2)) / keep.sum((1, 2)).clamp_min(1)
        else:
            dev = (xf - xf.mean(1, keepdim=True)).square().mean((1, 2))
        per_row = (dev * x.shape[-1]).tolist()
        values = per_row if self.per_head else [sum(per_row) / len(per_row)]
        for u, e in zip(self._units(kind, layer), values):
            old = self.energy.get(u)
            self.energy[u] = e if old is None else (1 - _EMA) * old + _EMA * e

    @staticmethod
    def _extras_bits(x: torch.Tensor, exclude: torch.Tensor | None) -> float:
        """Estimated bits of what ``exclude`` sends elsewhere: sinks (whole tokens) and outliers."""
        if exclude is None:
            return 0.0
        sink_elements = int(whole_tokens(exclude).sum()) * x.shape[-1]
        outliers = int(exclude.count_nonzero()) - sink_elements
        return sink_elements * (8 + 32 / x.shape[-1]) + outliers * _OUTLIER_BITS

    # -- allocation ---------------------------------------------------------------------------------
    def _all_units(self) -> list[Unit]:
        layers = [layer for layer in range(self.num_layers) if not self.q.is_edge(layer, self.num_layers)]
        return [u for layer in layers for k in KINDS for u in self._units(k, layer)]

    def _new_round(self, x: torch.Tensor) -> None:
        """The round that starts with this block of layer 0's keys: its code budget, and (once every
        unit has statistics) every unit's width."""
        self.rows = x.shape[0]
        n_round = x.numel() * 2 * self.num_layers  # every layer and kind holds a block of this size
        n_edge = x.numel() * 2 * self._edges()  # ... of which the edge layers', at their own width
        meta = sum(metadata_bits(self.q, k, x.shape[-1]) for k in KINDS) / 2
        extras_rate = self.extras_bits / self.elements if self.elements else 0.0
        spent = self.body_bits + self.extras_bits
        allowed = self.q.budget_bits * (self.elements + n_round) - spent - extras_rate * n_round - self.q.edge_bits * n_edge
        self.code_target = allowed / (n_round - n_edge) - meta  # mean code bits per allocated unit this round
        units = self._all_units()
        self.table = self._solve(units, self.code_target) if all(u in self.energy for u in units) else {}
        self.rounds += 1
        self.history.append({"round": self.rounds, "code_target": self.code_target})

    def _decide_causally(self, units: list[Unit]) -> None:
        """First round: the units seen so far are all there is; solve among them (these units included)
        at the round's code target, and fix these units' widths."""
        seen = [u for u in self._all_units() if u in self.energy]
        solved = self._solve(seen, self.code_target)
        for u in units:
            self.table[u] = solved[u]

    def _weights(self, units: list[Unit]) -> dict[Unit, float]:
        """Each unit's importance: its energy relative to its kind's mean, to ``sensitivity_power``,
        times ``kind_weight`` for keys."""
        out = {}
        for kind in KINDS:
            mine = [u for u in units if u[0] == kind]
            if not mine:
                continue
            ref = sum(self.energy[u] for u in mine) / len(mine)
            kw = self.q.kind_weight if kind == "key" else 1.0
            for u in mine:
                out[u] = kw * ((self.energy[u] / ref) if ref > 0 else 1.0) ** self.q.sensitivity_power
        return out

    def _solve(self, units: list[Unit], code_target: float) -> dict[Unit, int]:
        """Greedy upgrades from the lowest width, the largest weighted error drop per extra bit first,
        while the mean width stays within ``code_target`` (D is convex in b: the lower hull's optimum)."""
        w = self._weights(units)
        table = {u: self.widths[0] for u in units}
        budget = (code_target - self.widths[0]) * len(units)
        nxt = {b: c for b, c in zip(self.widths, self.widths[1:])}
        heap = []
        for i, u in enumerate(units):
            self._push(heap, u, i, table[u], w[u], nxt)
        while heap:
            _, i, u, b, c = heapq.heappop(heap)
            if c - b > budget + 1e-9:
                continue  # this unit's next step does not fit; cheaper steps of others may
            table[u] = c
            budget -= c - b
            self._push(heap, u, i, c, w[u], nxt)
        return table

    def _push(self, heap: list, u: Unit, i: int, b: int, weight: float, nxt: dict) -> None:
        c = nxt.get(b)
        if c is not None:
            d = self._dist[u[0]]
            heapq.heappush(heap, (-weight * (d[b] - d[c]) / (c - b), i, u, b, c))
