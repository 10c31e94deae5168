"""KL divergence and top-1 agreement against the uncompressed model, beside perplexity."""

from __future__ import annotations

import pytest
import torch

from streamkv.lab.compression import build_compression
from streamkv.lab.context import RunContext, new_cache
from streamkv.lab.streaming import compare_logprobs, token_logprobs
from streamkv.lab.tasks.perplexity import Perplexity

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(chr(32 + (i * 7919) % 95) for i in range(400))


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) - 32 for c in text]}


def run_ppl(model, quantizer, **task):
    comp = build_compression(quantizer, "none", "none")
    ctx = RunContext(model, CharTokenizer(), comp, 32, lambda: TEXT, progress=False)
    return Perplexity(window=128, max_windows=3, **task).run(ctx)["metrics"]


def uniform(bits):
    return {"name": "uniform", "key_bits": bits, "value_bits": bits, "key_group_size": 16, "value_group_size": 16,
            "rotate_keys": True, "rotate_values": True}


def test_uncompressed_run_has_kl_exactly_zero_and_full_agreement(tiny_llama):
    m = run_ppl(tiny_llama, "none")
    assert m["kl"] == 0.0 and m["kl_p99"] == 0.0 and m["top1_agreement"] == 1.0
    full = run_ppl(tiny_llama, "none", mode="full")
    assert full["kl"] == 0.0 and full["top1_agreement"] == 1.0


def test_a_real_reference_pass_through_an_uncompressed_cache_is_bit_identical(tiny_llama):
    ids = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(0))
    res = compare_logprobs(tiny_llama, ids, new_cache(tiny_llama, build_compression(), 32), new_cache(tiny_llama, build_compression(), 32), 32)
    assert torch.equal(res["kl"], torch.zeros(149)) and bool(res["top1"].all())
    lp, _ = token_logprobs(tiny_llama, ids, new_cache(tiny_llama, build_compression(), 32), 32)
    assert torch.equal(lp, res["logprobs"])  # the same tokens are scored as the perplexity protocol scores


def test_kl_grows_as_bits_shrink(tiny_llama):
    metrics = {b: run_ppl(tiny_llama, uniform(b)) for b in (8, 4, 3, 2)}
    kl = [metrics[b]["kl"] for b in (8, 4, 3, 2)]
    assert 0 < kl[0] < kl[1] < kl[2] < kl[3]
    assert all(metrics[b]["kl_p99"] >= metrics[b]["kl"] for b in metrics)
    assert metrics[8]["top1_agreement"] >= metrics[2]["top1_agreement"]
    assert metrics[2]["top1_agreement"] < 1.0


def test_kl_can_be_turned_off(tiny_llama):
    m = run_ppl(tiny_llama, uniform(4), kl=False)
    assert "kl" not in m and "top1_agreement" not in m and m["ppl"] > 1
    assert m["ppl"] == pytest.approx(run_ppl(tiny_llama, uniform(4))["ppl"], rel=1e-6)


def test_reference_kept_across_runs_gives_the_same_kl(tiny_llama):
    comp = build_compression(uniform(3), "none", "none")
    ctx = RunContext(tiny_llama, CharTokenizer(), comp, 32, lambda: TEXT, progress=False)
    task = Perplexity(window=128, max_windows=3, kl_cache_mb=64)
    first = task.run(ctx)["metrics"]
    assert len(task._kept()) == 3
    again = task.run(ctx)["metrics"]  # from the kept reference: no reference forwards
    assert again == first
    assert Perplexity(window=128, max_windows=3).run(ctx)["metrics"] == first
