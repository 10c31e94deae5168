"""The peers as registered strategies: each composes from its preset and runs the streaming protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import DynamicCache

import streamkv.lab.schema  # noqa: F401
from streamkv import CompressedCache, Compression, ConfigError
from streamkv.kv.storage.codebook import quantize_codebook
from streamkv.kv.storage.levels import normal_float as codebook
from streamkv.kv.storage.packed import quantize
from streamkv.lab import registry
from streamkv.lab.compression import build_compression, describe
from streamkv.lab.context import new_cache
from streamkv.lab.peers.hf import HFQuanto, held_bytes
from streamkv.lab.streaming import token_logprobs

CONF = Path(__file__).resolve().parent.parent / "conf"
registry.load_builtins()


pytestmark = pytest.mark.usefixtures("one_thread")

PEERS = ["kivi", "kvquant", "int_per_token", "hf_quanto", "hf_hqq", "hf_fp8"]
HF_PACKAGES = {"hf_quanto": "optimum.quanto", "hf_hqq": "hqq"}


def peer(experiment: str, *overrides: str) -> Compression:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"experiment={experiment}", *overrides])
    return build_compression(*(cfg[g] for g in ("quantizer", "sink", "outlier")))


def need_backend(name: str) -> None:
    if name not in registry.names("quantizer"):
        return
    reason = getattr(registry.get("quantizer", name), "missing", lambda: None)()
    if reason:
        pytest.skip(reason)


def stream(model, compression: Compression, n: int = 512, chunk: int = 128):
    cache = new_cache(model, compression, chunk)
    ids = torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(1))
    lp, _ = token_logprobs(model, ids, cache, chunk)
    return cache, ids, lp


@pytest.mark.parametrize("experiment", PEERS)
def test_peer_composes_and_streams(experiment, tiny64):
    need_backend(experiment)
    comp = peer(experiment)
    expected = {"kivi": "uniform", "kvquant": "nonuniform"}.get(experiment, experiment)
    assert describe(comp)["quantizer"] == expected
    cache, ids, lp = stream(tiny64, comp)
    assert lp.shape == (len(ids) - 1,) and torch.isfinite(lp).all()
    stats = cache.stats()
    ours = CompressedCache.for_model(tiny64, build_compression(), 128)
    token_logprobs(tiny64, ids[:8], ours, 8)
    assert set(stats) >= set(ours.stats())  # the same report as the compressed cache
    assert stats["tokens"] == len(ids)
    assert 2 < stats["avg_key_bits"] < 16 and 2 < stats["avg_value_bits"] < 16
    assert stats["kv_bytes_fp16"] == 2 * 2 * len(ids) * 64 * 2  # layers * (K, V) * tokens * head_dim * fp16 bytes


def test_kivi_keeps_the_most_recent_tokens_at_full_precision(tiny64):
    comp = peer("kivi")
    assert (comp.quantizer.residual_length, comp.quantizer.key_group_size, comp.quantizer.pre_rope) == (128, 32, False)
    cache, ids, _ = stream(tiny64, comp, n=500)
    ref = DynamicCache()
    token_logprobs(tiny64, ids, ref, 128)
    for i, (layer, dyn) in enumerate(zip(cache.layers, ref.layers)):
        kept = layer.k.residual.shape[1]
        assert 128 <= kept < 128 + 32  # the window, plus the tail that does not fill a key group
        assert layer.body_tokens == len(ids) - kept
        if i == 0:  # the first layer's inputs do not depend on the cache: its recent K/V are the exact ones
            assert torch.equal(layer.k.residual, dyn.keys[0, :, -kept:])  # post-RoPE keys
            assert torch.equal(layer.v.residual, dyn.values[0, :, -kept:])


def test_kvquant_puts_one_percent_in_the_sparse_part(tiny64):
    comp = peer("kvquant")
    assert comp.quantizer.pre_rope and comp.quantizer.codebook == "nf"
    assert (comp.sink.size, comp.sink.key_bits, comp.outlier.fraction, comp.outlier.key_bits) == (1, 16, 0.01, 16)
    cache, _, _ = stream(tiny64, comp)
    stats = cache.stats()
    for kind in ("key", "value"):
        assert 0.009 <= stats[f"{kind}_outlier_fraction"] <= 0.012
        assert stats["bytes_by_part"][kind]["outliers"] > 0 and stats["bytes_by_part"][kind]["sinks"] > 0


def test_int_per_token_groups_span_the_head(tiny64):
    comp = peer("int_per_token", "quantizer.key_bits=4", "quantizer.value_bits=4")
    cache, ids, _ = stream(tiny64, comp, n=256)
    body = cache.layers[0].k.body
    assert body.axis == "token" and body.group_size == 64 and body.scale.shape[-2:] == (1, 1)
    assert cache.stats()["avg_key_bits"] == pytest.approx(4 + 32 / 64)


def test_nf_codebook_is_symmetric_and_denser_in_the_middle():
    for bits in (2, 3, 4):
        lv = codebook(bits, "nf")
        assert lv.shape == (2**bits,) and lv[0] == -1 and lv[-1] == 1
        torch.testing.assert_close(lv, -lv.flip(0))
        gaps = lv.diff()
        assert gaps[len(gaps) // 2] < gaps[0]
    torch.testing.assert_close(codebook(3, "uniform"), torch.linspace(-1, 1, 8))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_codes_are_packed_and_nearest(bits):
    x = torch.randn(3, 128, 64, generator=torch.Generator().manual_seed(bits))
    q = quantize_codebook(x, bits, "channel", 128, "nf")
    assert q.codes.nbytes == x.numel() * bits // 8
    assert q.nbytes == q.codes.nbytes + q.scale.nbytes + q.zero.nbytes + q.levels.nbytes
    y = q.dequantize(torch.float32)
    # every value decodes to its nearest level: the error is at most half the widest gap, times the scale
    half_gap = codebook(bits, "nf").diff().max() / 2
    assert ((y - x).abs() <= half_gap * q.scale.float().max() * 1.01 + 1e-3).all()
    # the uniform codebook is the uniform quantizer's grid (up to fp16 rounding of scale and zero at ties)
    u = quantize_codebook(x, bits, "token", 16, "uniform").dequantize(torch.float32)
    err_u, err_int = (u - x).abs().mean(), (quantize(x, bits, "token", 16).dequantize(torch.float32) - x).abs().mean()
    assert err_u == pytest.approx(err_int.item(), rel=0.02)
    both = q.append(q)
    assert both.tokens == 256 and torch.equal(both.dequantize(torch.float32)[:, 128:], y)


def test_nf_beats_uniform_on_gaussian_values():
    x = torch.randn(4, 256, 64, generator=torch.Generator().manual_seed(0))
    err = {k: (quantize_codebook(x, 3, "token", 64, k).dequantize(torch.float32) - x).pow(2).mean() for k in ("nf", "uniform")}
    assert err["nf"] < err["uniform"]


@pytest.mark.parametrize("name,bits,expected", [("hf_quanto", 4, 4 + 64 / 64), ("hf_hqq", 4, 4 + 64 / 64), ("hf_fp8", 8, 8)])
def test_hf_stats_count_the_held_tensors(name, bits, expected, tiny64):
    need_backend(name)
    comp = peer(name) if name == "hf_fp8" else peer(name, f"quantizer.bits={bits}")
    cache, ids, _ = stream(tiny64, comp, n=512)
    stats = cache.stats()
    held = sum(held_bytes(layer._quantized_keys) + held_bytes(layer._quantized_values) + layer.keys.nbytes + layer.values.nbytes
               for layer in cache.layers)
    assert stats["kv_bytes"] == held
    # fp32 model: scale and zero are fp32 per group of 64 (quanto, HQQ); fp8 adds one scale per tensor
    assert stats["avg_bits"] == pytest.approx(expected, abs=0.01)


def test_hf_peers_refuse_the_simulated_protocol(tiny64):
    with pytest.raises(ConfigError, match="task.mode=stream"):
        new_cache(tiny64, peer("hf_fp8"), 128, quantize_own_chunk=True)


def test_missing_backend_is_a_clear_error(monkeypatch, tiny64):
    monkeypatch.setattr(HFQuanto, "package", "streamkv_no_such_backend")
    comp = peer("hf_quanto")
    assert "pip install optimum-quanto" in HFQuanto.missing()
    with pytest.raises(ConfigError, match="pip install optimum-quanto"):
        new_cache(tiny64, comp, 128)


def test_wrapped_caches_refuse_sinks_and_outliers(tiny64):
    with pytest.raises(ConfigError, match="sink=none outlier=none"):
        new_cache(tiny64, build_compression("hf_fp8", "fixed", "none"), 128)
    with pytest.raises(ConfigError, match="experiment=hf_fp8"):
        new_cache(tiny64, build_compression("hf_fp8", "none", "topk"), 128)
