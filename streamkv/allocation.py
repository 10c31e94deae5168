"""Mixed precision without calibration: per-layer key and value widths chosen online under a bit budget.

A :class:`BudgetAllocator` is the per-sequence encoder of a quantizer with ``budget_bits`` (one per
cache, from the quantizer's ``for_stream``). It is told each layer's index and keeps, per *unit*
(layer x kind), a statistic of the stream: the energy of the block's deviations from their channel
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

import math
from typing import Any

import torch

from .codebooks import gaussian_mse
from .errors import check

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


class BudgetAllocator:
    """The per-sequence encoder of a budgeted quantizer; see the module docstring."""

    def __init__(self, quantizer: Any, num_layers: int):
        self.q = quantizer
        self.num_layers = num_layers
        self.widths = sorted(quantizer.widths)
        self.energy: dict[tuple[str, int], float] = {}  # unit -> smoothed deviation energy per token
        self.table: dict[tuple[str, int], int] = {}  # unit -> width for the current round
        self.body_bits = 0.0  # codes, scales and zeros produced so far (exact: their bytes)
        self.extras_bits = 0.0  # sinks and outliers sent elsewhere so far (estimated from the masks)
        self.elements = 0  # elements compressed so far
        self.rounds = 0
        self.meta: dict[str, float] = {}  # bits per element of scales/zeros, per kind (measured)
        self.history: list[dict] = []  # per round: target code bits and the table (for reports)

    # -- the encoder interface ----------------------------------------------------------------------
    def encode_keys(self, x: torch.Tensor, exclude: torch.Tensor | None = None, layer: int = 0):
        if layer == 0:
            self._new_round(x)
        return self._encode("key", x, exclude, layer)

    def encode_values(self, x: torch.Tensor, exclude: torch.Tensor | None = None, layer: int = 0):
        return self._encode("value", x, exclude, layer)

    def _encode(self, kind: str, x: torch.Tensor, exclude: torch.Tensor | None, layer: int):
        unit = (kind, layer)
        bits = self.table.get(unit)
        if bits is None:  # a layer the round's table does not know (e.g. a first call not at layer 0)
            bits = self._prior_width(kind)
        self._observe(unit, x, exclude)
        enc = self.q._encode(kind, x, exclude, bits)
        numel = x.numel()
        self.meta.setdefault(kind, 8 * enc.nbytes / numel - bits)
        self.body_bits += 8 * enc.nbytes
        self.extras_bits += self._extras_bits(x, exclude)
        self.elements += numel
        return enc

    # -- statistics ---------------------------------------------------------------------------------
    def _observe(self, unit: tuple[str, int], x: torch.Tensor, exclude: torch.Tensor | None) -> None:
        xf = x.float()
        if exclude is not None and bool(exclude.any()):
            keep = (~exclude).float()
            n = keep.sum(1, keepdim=True).clamp_min(1)
            mean = (xf * keep).sum(1, keepdim=True) / n
            dev = ((xf - mean) * keep).square().sum() / keep.sum().clamp_min(1)
        else:
            dev = (xf - xf.mean(1, keepdim=True)).square().mean()
        e = float(dev) * x.shape[-1]  # per token: E||x_t - mean||^2
        old = self.energy.get(unit)
        self.energy[unit] = e if old is None else (1 - _EMA) * old + _EMA * e

    @staticmethod
    def _extras_bits(x: torch.Tensor, exclude: torch.Tensor | None) -> float:
        """Estimated bits of what ``exclude`` sends elsewhere: sinks (whole tokens) and outliers."""
        if exclude is None:
            return 0.0
        whole = exclude.all(-1)
        sink_elements = int(whole.sum()) * x.shape[-1]
        outliers = int(exclude.sum()) - sink_elements
        return sink_elements * (8 + 32 / x.shape[-1]) + outliers * _OUTLIER_BITS

    # -- allocation ---------------------------------------------------------------------------------
    def _prior_width(self, kind: str) -> int:
        return self.table.get((kind, -1), self.widths[0])

    def _new_round(self, x: torch.Tensor) -> None:
        """Choose every unit's width for the round that starts with this block of layer 0's keys."""
        units = [(k, layer) for layer in range(self.num_layers) for k in KINDS]
        n_round = x.numel() * len(units)  # every layer and kind holds a block of this size
        meta = {k: self.meta.get(k, metadata_bits(self.q, k, x.shape[-1])) for k in KINDS}
        extras_rate = self.extras_bits / self.elements if self.elements else 0.0
        spent = self.body_bits + self.extras_bits
        allowed = self.q.budget_bits * (self.elements + n_round) - spent - extras_rate * n_round
        code_target = allowed / n_round - sum(meta.values()) / 2  # mean code bits per unit
        self.table = self._solve(units, code_target)
        for kind in KINDS:  # a layer outside the table (never with a whole model) takes layer 0's width
            self.table[(kind, -1)] = self.table[(kind, 0)]
        self.history.append({"round": self.rounds, "code_target": code_target,
                             "mean_width": sum(self.table[u] for u in units) / len(units)})
        self.rounds += 1

    def _weights(self, units: list[tuple[str, int]]) -> dict[tuple[str, int], float]:
        """Each unit's importance: its energy relative to its kind's mean, to ``sensitivity_power``,
        times ``kind_weight`` for keys; 1 for units not seen yet."""
        out = {}
        for kind in KINDS:
            es = [self.energy[u] for u in units if u[0] == kind and u in self.energy]
            ref = sum(es) / len(es) if es else 0.0
            kw = self.q.kind_weight if kind == "key" else 1.0
            for u in units:
                if u[0] != kind:
                    continue
                e = self.energy.get(u)
                rel = (e / ref) if (e is not None and ref > 0) else 1.0
                out[u] = kw * rel ** self.q.sensitivity_power
        return out

    def _solve(self, units: list[tuple[str, int]], code_target: float) -> dict[tuple[str, int], int]:
        """Greedy upgrades from the lowest width: the largest weighted error drop per extra bit first,
        while the mean width stays within ``code_target``."""
        w = self._weights(units)
        dist = {k: {b: relative_distortion(getattr(self.q, f"{k}_codebook"), b) for b in self.widths} for k in KINDS}
        table = {u: self.widths[0] for u in units}
        budget = code_target * len(units) - self.widths[0] * len(units)
        order = {u: i for i, u in enumerate(units)}
        while True:
            best, best_gain, best_cost = None, 0.0, 0
            for u in units:
                b = table[u]
                nxt = [c for c in self.widths if c > b]
                if not nxt:
                    continue
                c = nxt[0]
                cost = c - b
                if cost > budget + 1e-9:
                    continue
                gain = w[u] * (dist[u[0]][b] - dist[u[0]][c]) / cost
                if best is None or gain > best_gain * (1 + 1e-12) or (abs(gain - best_gain) <= 1e-12 * best_gain and order[u] < order[best]):
                    best, best_gain, best_cost = u, gain, cost
            if best is None:
                return table
            table[best] += best_cost
            budget -= best_cost
