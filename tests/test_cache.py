
import pytest
import torch
from transformers import DynamicCache

from streamkv import CompressedCache, ConfigError
from streamkv.kv.outliers.ema_relative import EmaChannelStats, EmaRelativeOutliers
from streamkv.kv.transforms.rope import RopeTable
from streamkv.lab.compression import build_compression
from streamkv.lab.streaming import token_logprobs

SEED = dict(quantizer={"name": "uniform", "key_group_size": 16, "value_group_size": 16}, sink="fixed", outlier="ema_relative")


def feed(model, ids, cache, chunk):
    with torch.inference_mode():
        out = [model(input_ids=ids[:, s : s + chunk], cache=cache, use_cache=True).logits for s in range(0, ids.shape[1], chunk)]
    return torch.cat(out, 1)


def test_uncompressed_logits_equal_dynamic_cache(tiny_llama):
    ids = torch.randint(0, 96, (1, 96))
    ours = feed(tiny_llama, ids, CompressedCache.for_model(tiny_llama, build_compression()), 32)
    ref = feed(tiny_llama, ids, DynamicCache(), 32)
    assert torch.equal(ours, ref)


def test_compressed_prefill_changes_logits_only_after_first_chunk(tiny_llama):
    ids = torch.randint(0, 96, (1, 64))
    cache = CompressedCache.for_model(tiny_llama, build_compression(**SEED), chunk_size=32)
    ours = feed(tiny_llama, ids, cache, 32)
    ref = feed(tiny_llama, ids, DynamicCache(), 32)
    assert torch.equal(ours[:, :32], ref[:, :32])  # the first chunk attends to itself at full precision
    assert not torch.equal(ours[:, 32:], ref[:, 32:])
    torch.testing.assert_close(ours, ref, atol=0.2, rtol=0)


def test_kv_bytes_is_the_sum_of_held_tensors(tiny_llama):
    cache = CompressedCache.for_model(tiny_llama, build_compression(**SEED), chunk_size=32)
    feed(tiny_llama, torch.randint(0, 96, (1, 70)), cache, 32)
    stats = cache.stats()
    assert stats["kv_bytes"] == sum(t.nbytes for t in cache.tensors())
    assert stats["kv_bytes_fp16"] == 2 * 2 * 2 * 70 * 2 * 16  # layers * (K,V) * heads * tokens * bytes * dim
    assert stats["tokens"] == 70
    parts = stats["bytes_by_part"]["key"]
    assert parts["residual"] > 0 and parts["body"] > 0 and parts["sinks"] > 0  # 70 = 4 full groups + 6


def test_stored_bits_match_the_format(tiny_llama):
    comp = build_compression({"name": "uniform", "key_group_size": 16, "value_group_size": 16}, "none", "none")
    cache = CompressedCache.for_model(tiny_llama, comp, chunk_size=32)
    feed(tiny_llama, torch.randint(0, 96, (1, 64)), cache, 32)
    s = cache.stats()
    assert s["avg_key_bits"] == pytest.approx(4 + 32 / 16)
    assert s["avg_value_bits"] == pytest.approx(4 + 32 / 16)
    assert s["compression_ratio_key"] == pytest.approx(16 / 6)


def _layer_after(model, comp, ids, chunk):
    cache = CompressedCache.for_model(model, comp, chunk_size=chunk)
    feed(model, ids, cache, chunk)
    return cache.layers[0]


def test_sinks_are_stored_at_their_precision(tiny_llama):
    ids = torch.randint(0, 96, (1, 32))
    for bits, dtype in ((8, torch.uint8), (16, torch.float16)):
        comp = build_compression(SEED["quantizer"], {"name": "fixed", "size": 4, "key_bits": bits, "value_bits": bits}, "none")
        layer = _layer_after(tiny_llama, comp, ids, 32)
        sinks = layer.k.sinks
        assert sinks.tokens == 4
        held = sinks.codes if bits == 8 else sinks.data
        assert held.dtype == dtype
        assert held.shape[:2] == (2, 4)


def test_sinks_replace_the_first_tokens_on_read(tiny_llama):
    comp = build_compression({"name": "uniform", "key_bits": 2, "value_bits": 2, "key_group_size": 16, "value_group_size": 16, "pre_rope": False},
                       {"name": "fixed", "size": 4, "key_bits": 16, "value_bits": 16}, "none", "dense")
    layer = CompressedCache.for_model(tiny_llama, comp, chunk_size=32).layers[0]
    k = torch.randn(1, 2, 32, 16)
    layer.update(k, k.clone())
    keys, _ = layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    torch.testing.assert_close(keys[:, :, :4], k[:, :, :4].half().float())  # fp16 sinks, not 2-bit groups
    assert (keys[:, :, 4:32] - k[:, :, 4:32]).abs().max() > 1e-2


def test_planted_outliers_are_found_and_restored():
    comp = build_compression({"name": "uniform", "key_bits": 4, "value_bits": 4, "key_group_size": 16, "value_group_size": 16, "pre_rope": False},
                       "none", {"name": "ema_relative", "threshold": 4.0})
    cache = CompressedCache(comp, num_layers=1)
    layer = cache.layers[0]
    torch.manual_seed(0)
    k = torch.randn(1, 2, 32, 16)
    planted = [(0, 3, 5, 40.0), (1, 20, 9, -55.0), (0, 31, 0, 33.0)]
    for h, t, d, val in planted:
        k[0, h, t, d] = val
    layer.update(k, torch.randn(1, 2, 32, 16))
    mask_idx = layer.k.outliers.offsets()
    found = {(int(i % (2 * 16) // 16), int(i // (2 * 16)), int(i % 16)) for i in mask_idx}
    assert {(h, t, d) for h, t, d, _ in planted} <= found
    assert layer.k.outliers.count < 0.02 * k.numel()
    keys, _ = layer.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    for h, t, d, val in planted:
        assert abs(keys[0, h, t, d].item() - val) <= abs(val) / 127  # within 8-bit error
    # and the outliers did not widen their groups: the rest of the group is at 4-bit precision
    rest = keys[0, :, :32].clone() - k[0]
    for h, t, d, _ in planted:
        rest[h, t, d] = 0
    assert rest.abs().max() < 0.6


def test_ema_update_matches_the_formula():
    stats = EmaChannelStats(decay=0.9)
    a, b = torch.randn(2, 10, 4), torch.randn(2, 10, 4) * 3 + 1
    stats.update(a)
    torch.testing.assert_close(stats.mean, a.mean(1))
    stats.update(b)
    torch.testing.assert_close(stats.mean, 0.9 * a.mean(1) + 0.1 * b.mean(1))
    torch.testing.assert_close(stats.std, 0.9 * a.std(1, correction=0) + 0.1 * b.std(1, correction=0))


def test_ema_decay_zero_uses_each_chunk_alone():
    det = EmaRelativeOutliers(threshold=2.0, ema_decay=0.0)
    state = det.new_state()
    det.detect(torch.randn(1, 10, 4) * 100, state)
    x = torch.randn(1, 10, 4)
    det.detect(x, state)
    torch.testing.assert_close(state.std, x.std(1, correction=0))


def test_rope_unrotate_inverts_rotate(tiny_llama):
    table = RopeTable(tiny_llama.model.rotary_emb)
    x = torch.randn(2, 40, 16)
    torch.testing.assert_close(table.unrotate(table.rotate(x, 7), 7), x, atol=1e-5, rtol=1e-5)


def test_pre_rope_keys_round_trip_through_8_bits(tiny_llama):
    comp = build_compression({"name": "uniform", "key_bits": 8, "value_bits": 8, "key_group_size": 16, "value_group_size": 16, "pre_rope": True}, "none", "none")
    cache = CompressedCache.for_model(tiny_llama, comp, chunk_size=32)
    ids = torch.randint(0, 96, (1, 48))
    ours = feed(tiny_llama, ids, cache, 16)
    ref = feed(tiny_llama, ids, DynamicCache(), 16)
    torch.testing.assert_close(ours, ref, atol=0.05, rtol=0)


def test_decoding_flushes_the_residual_in_whole_groups(tiny_llama):
    comp = build_compression(**SEED)
    cache = CompressedCache.for_model(tiny_llama, comp, chunk_size=16)
    feed(tiny_llama, torch.randint(0, 96, (1, 20)), cache, 16)
    layer = cache.layers[0]
    assert (layer.body_tokens, layer.k.residual.shape[1]) == (16, 4)
    feed(tiny_llama, torch.randint(0, 96, (1, 12)), cache, 1)  # 12 decode steps
    assert (layer.body_tokens, layer.k.residual.shape[1]) == (32, 0)
    assert cache.get_seq_length() == 32


def test_kivi_style_residual_window_stays_full_precision(tiny_llama):
    comp = build_compression({"name": "uniform", "key_group_size": 16, "value_group_size": 16, "residual_length": 20}, "none", "none")
    cache = CompressedCache.for_model(tiny_llama, comp, chunk_size=16)
    feed(tiny_llama, torch.randint(0, 96, (1, 64)), cache, 16)
    layer = cache.layers[0]
    assert layer.k.residual.shape[1] >= 20 and layer.body_tokens + layer.k.residual.shape[1] == 64


def test_streaming_scores_every_token_after_the_first(tiny_llama):
    ids = torch.randint(0, 96, (100,))
    lp, _ = token_logprobs(tiny_llama, ids, CompressedCache.for_model(tiny_llama, build_compression()), 32)
    full = torch.log_softmax(tiny_llama(input_ids=ids[None]).logits[0, :-1].float(), -1).gather(1, ids[1:, None])[:, 0]
    assert lp.shape == (99,)
    torch.testing.assert_close(lp, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(quantizer={"name": "uniform", "key_bits": 5}), "key_bits=5"),
        (dict(quantizer={"name": "uniform", "value_bits": 1}), "value_bits=1"),
        (dict(sink={"name": "fixed", "size": -1}), "sink.size=-1"),
        (dict(sink={"name": "fixed", "key_bits": 6}), "sink.key_bits=6"),
        (dict(outlier={"name": "ema_relative", "ema_decay": 1.0}), r"ema_decay=1.0"),
        (dict(outlier={"name": "ema_relative", "ema_decay": -0.1}), r"ema_decay=-0.1"),
        (dict(outlier={"name": "ema_relative", "threshold": 0}), "threshold=0"),
        (dict(outlier={"name": "ema_relative", "key_bits": 4}), "key_bits=4"),
        (dict(quantizer={"name": "uniform", "key_axis": "row"}), "key_axis='row'"),
    ],
)
def test_bad_component_values_fail_with_one_line(kwargs, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_compression(**kwargs)
    assert "\n" not in str(e.value)


def test_group_size_must_divide_head_dim(tiny_llama):
    with pytest.raises(ConfigError, match="value_group_size=12 does not divide head_dim=16"):
        CompressedCache.for_model(tiny_llama, build_compression({"name": "uniform", "value_group_size": 12}))


def test_chunk_smaller_than_a_key_group_is_refused(tiny_llama):
    with pytest.raises(ConfigError, match="chunk_size=64 is smaller than a key group"):
        CompressedCache.for_model(tiny_llama, build_compression({"name": "uniform", "key_group_size": 128, "value_group_size": 16}), chunk_size=64)


def test_unsupported_family_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ConfigError, match=r"'gpt2' is not supported.*llama"):
        CompressedCache.for_model(gpt2, build_compression("uniform"))


def test_rotated_8_bit_cache_stays_close_to_full_precision(tiny_llama):
    q = {"name": "uniform", "key_bits": 8, "value_bits": 8, "key_group_size": 16, "value_group_size": 16,
         "rotate_keys": True, "rotate_values": True}
    cache = CompressedCache.for_model(tiny_llama, build_compression(q, "fixed", "ema_relative"), chunk_size=16)
    ids = torch.randint(0, 96, (1, 48))
    torch.testing.assert_close(feed(tiny_llama, ids, cache, 16), feed(tiny_llama, ids, DynamicCache(), 16), atol=0.05, rtol=0)
    assert cache.stats()["kv_bytes"] == sum(t.nbytes for t in cache.tensors())
