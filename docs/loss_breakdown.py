"""Where a budgeted preset's loss sits: KL divergence with one kind, or one third of the layers, exempted.

The preset runs as usual (its widths chosen online under its budget), except that the exempted units
are stored at 8 bits after the allocator has decided: the KL that disappears is what those units
carried. Also prints the widths the allocator chose in the last round of the last window.

    python docs/loss_breakdown.py kv2 [windows] [path/to/wikitext-2-raw/test.txt]
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from streamkv.kv.compression import Compression
from streamkv.kv.quantizers.budget import BudgetAllocator
from streamkv.kv.quantizers.lloyd_max import LloydMaxQuantizer
from streamkv.lab.compression import build_compression
from streamkv.lab.context import new_cache
from streamkv.lab.models.causal_lm import CausalLM
from streamkv.lab.streaming import compare_logprobs, windows


class Exempting(BudgetAllocator):
    """Allocates as the preset does, then stores the units ``exempt`` picks at 8 bits; the extra bits
    are not charged to the budget, so the other units keep the widths they would have had."""

    exempt = staticmethod(lambda unit: False)

    def _widths(self, kind, layer):
        chosen = super()._widths(kind, layer)
        units = self._units(kind, layer)
        self._extra = sum(8 - b for u, b in zip(units, chosen) if self.exempt(u))
        return [8 if self.exempt(u) else b for u, b in zip(units, chosen)]

    def _encode(self, kind, x, exclude, layer):
        enc = super()._encode(kind, x, exclude, layer)
        self.body_bits -= self._extra * x.numel() / len(self._units(kind, layer))
        return enc


@dataclass
class Exempt(LloydMaxQuantizer):
    def for_stream(self, num_layers):
        enc = Exempting(self, num_layers)
        enc.exempt = self.rule
        return enc


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "kv2"
    n_windows = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    path = sys.argv[3] if len(sys.argv) > 3 else os.environ["STREAMKV_WIKITEXT"]
    from streamkv.lab.bench.plan import compression_for

    base, resolved = compression_for([f"experiment={preset}"])
    q = resolved["quantizer"]
    q.pop("name", None)
    model, tok = CausalLM().load()
    ids = torch.tensor(tok(open(path).read(), add_special_tokens=False)["input_ids"])
    wins = list(windows(ids, 2048, n_windows))
    layers = model.config.num_hidden_layers
    thirds = [range(i * layers // 3, (i + 1) * layers // 3) for i in range(3)]
    rules = {"none exempt": lambda u: False, "keys at 8 bits": lambda u: u[0] == "key", "values at 8 bits": lambda u: u[0] == "value"}
    for t in thirds:
        rules[f"keys of layers {t.start}-{t.stop - 1} at 8 bits"] = lambda u, t=t: u[0] == "key" and u[1] in t
    print(f"{preset}: {q}")
    print("| exempted | avg bits | KL | top-1 |")
    print("|---|---|---|---|")
    for label, rule in rules.items():
        quant = Exempt(**q)
        quant.rule = rule
        comp = Compression(quant, base.sink, base.outlier, base.attention)
        kls, top = [], []
        for w in wins:
            cache = new_cache(model, comp, 512)
            res = compare_logprobs(model, w, cache, new_cache(model, build_compression(), 512), 512)
            kls.append(res["kl"])
            top.append(res["top1"])
        stats = cache.stats()
        print(f"| {label} | {stats['avg_bits']:.3f} | {torch.cat(kls).mean():.5f} | {torch.cat(top).double().mean():.4f} |", flush=True)
        if label == "none exempt":
            table = cache.compression.quantizer.table
            for kind in ("key", "value"):
                rows = sorted({u[2] for u in table if u[0] == kind})
                print(f"<!-- {kind} widths per layer (heads): "
                      + " ".join("/".join(str(table[(kind, layer, r)]) for r in rows) for layer in range(layers)) + " -->")


if __name__ == "__main__":
    main()
