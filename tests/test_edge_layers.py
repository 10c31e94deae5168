"""Edge layers: the first and last N layers at edge_bits (fp16 by default), counted in every byte report
and, under a budget, paid for out of it; an impossible budget fails in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_family_model

from streamkv import CompressedCache, ConfigError
from streamkv.kv.storage.raw import Raw
from streamkv.lab.compression import build_compression

G = {"key_group_size": 16, "value_group_size": 16}


def feed(model, comp, n=96, chunk=32):
    cache = CompressedCache.for_model(model, comp, chunk_size=chunk)
    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for s in range(0, n, chunk):
            model(input_ids=ids[:, s : s + chunk], cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("quantizer", [{"name": "uniform", "key_bits": 2, "value_bits": 2, **G},
                                       {"name": "lloyd_max", "key_bits": 2, "value_bits": 2, **G}])
def test_edge_layers_hold_fp16_and_the_bits_report_says_so(quantizer):
    model = tiny_family_model("llama")  # 4 layers
    cache = feed(model, build_compression({**quantizer, "edge_layers": 1}, "none", "none"))
    kinds = [type(layer.k.body).__name__ for layer in cache.layers]
    assert isinstance(cache.layers[0].k.body, Raw) and isinstance(cache.layers[3].v.body, Raw), kinds
    assert not isinstance(cache.layers[1].k.body, Raw) and not isinstance(cache.layers[2].v.body, Raw), kinds
    bits = [round(row["avg_key_bits"], 2) for row in cache.stats()["per_layer"]]
    assert bits[0] == bits[3] == 16.0 and bits[1] <= 4 and bits[2] <= 4, bits
    plain = feed(model, build_compression(quantizer, "none", "none")).stats()["avg_bits"]
    assert cache.stats()["avg_bits"] == pytest.approx(plain / 2 + 16 / 2, rel=1e-6)  # half the layers at 16 bits


def test_a_budget_pays_for_its_edge_layers():
    model = tiny_family_model("llama")
    q = {"name": "lloyd_max", "budget_bits": 11.0, "edge_layers": 1, **G}  # 2 of 4 layers at 16 bits: 8 of the 11
    cache = feed(model, build_compression(q, "none", "none"), n=192)
    stats = cache.stats()
    assert stats["avg_bits"] == pytest.approx(11.0, abs=0.35)  # everything counted, edges included
    rows = stats["per_layer"]
    assert rows[0]["avg_key_bits"] == 16.0 and rows[1]["avg_key_bits"] < 9


def test_a_budget_the_edge_layers_make_impossible_fails_in_one_line():
    model = tiny_family_model("llama")
    q = {"name": "lloyd_max", "budget_bits": 4.0, "edge_layers": 1, **G}
    with pytest.raises(ConfigError, match=r"budget_bits=4.0 cannot be met with quantizer.edge_layers=1 at edge_bits=16"):
        CompressedCache.for_model(model, build_compression(q, "none", "none"), chunk_size=32)


def test_bad_edge_settings_fail_in_one_line():
    with pytest.raises(ConfigError, match=r"quantizer.edge_bits=5 is not allowed"):
        build_compression({"name": "uniform", "edge_layers": 1, "edge_bits": 5})
    with pytest.raises(ConfigError, match=r"quantizer.edge_layers=-1 must be >= 0"):
        build_compression({"name": "uniform", "edge_layers": -1})
