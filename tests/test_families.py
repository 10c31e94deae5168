"""Every supported family, on a tiny random model built offline from its config (see conftest.TINY_FAMILIES).

The model facts read from each family's config; one-line errors for unsupported families and features;
the pre-load family check; the GGUF route's configs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_FAMILIES, WINDOW, tiny_family_config, tiny_family_model
from transformers import DynamicCache

from streamkv import CompressedCache, ConfigError
from streamkv.kv.model_facts import (
    FULL,
    LINEAR,
    SHARED,
    SLIDING,
    SUPPORTED_FAMILIES,
    facts_of,
    read_facts,
    rotary_module,
    takes_layer_type,
)
from streamkv.kv.transforms.rope import RopeTable
from streamkv.lab.compression import CompressionConfig, build_compression

FAMILIES = list(TINY_FAMILIES)
S, F = SLIDING, FULL

# family -> (kinds per layer, head_dim per KV layer, NoPE layers, rotary width per KV layer, wants_bos)
EXPECTED = {
    "llama": ([F] * 4, [16] * 4, [], [16] * 4, None),
    "mistral": ([S] * 4, [16] * 4, [], [16] * 4, None),
    "qwen2": ([F] * 4, [16] * 4, [], [16] * 4, False),
    "qwen3": ([F] * 4, [16] * 4, [], [16] * 4, False),
    "qwen3_5_text": ([LINEAR] * 3 + [F], [32], [], [8], False),  # partial rotary: 0.25 of 32
    "gemma2": ([S, F] * 2, [16] * 4, [], [16] * 4, True),
    "gemma3_text": ([S, F] * 2, [16] * 4, [], [16] * 4, True),
    "gemma4_text": ([S, F] * 2 + [SHARED] * 2, [16, 32, 16, 32], [], [16, 32, 16, 32], True),  # proportional: full width
    "olmo2": ([F] * 4, [16] * 4, [], [16] * 4, None),
    "olmo3": ([S] * 3 + [F], [16] * 4, [], [16] * 4, None),
    "phi3": ([S] * 4, [16] * 4, [], [16] * 4, None),
    "smollm3": ([F] * 4, [16] * 4, [1, 3], [16, 0, 16, 0], None),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_facts_of_each_family(family):
    kinds, head_dims, nope, rotary, bos = EXPECTED[family]
    facts = read_facts(tiny_family_config(family))  # from the config alone: no weights
    assert facts.family in SUPPORTED_FAMILIES and family.startswith(facts.family)
    assert [layer.kind for layer in facts.layers] == kinds
    kv = facts.kv_layers
    assert [layer.head_dim for layer in kv] == head_dims
    assert [layer.index for layer in kv if not layer.rope] == nope
    assert [layer.rotary_dim for layer in kv] == rotary
    assert all(layer.window == WINDOW for layer in facts.layers if layer.kind == SLIDING)
    assert all(layer.window is None for layer in facts.layers if layer.kind != SLIDING)
    assert facts.max_positions == 256 and facts.wants_bos is bos
    assert facts == facts_of(tiny_family_model(family))  # the loaded model says the same
    assert "\n" not in facts.summary()


@pytest.mark.parametrize("family", FAMILIES)
def test_rotary_width_is_what_the_model_applies(family):
    """The facts' rotary width per layer type is the width of the cos/sin the model's rotary module makes."""
    model = tiny_family_model(family)
    rot = rotary_module(model)
    for layer in facts_of(model).kv_layers:
        if layer.rope:
            extra = (layer.rope_key,) if takes_layer_type(rot) else ()
            cos, _ = rot(torch.empty(0), torch.arange(3)[None], *extra)
            assert cos.shape[-1] == layer.rotary_dim


def test_facts_name_the_per_layer_type_rope():
    g3 = read_facts(tiny_family_config("gemma3_text"))
    assert {(layer.rope_key, layer.rope_theta) for layer in g3.kv_layers} == {("sliding_attention", 10000.0), ("full_attention", 1e6)}
    g4 = read_facts(tiny_family_config("gemma4_text"))
    full = [layer for layer in g4.kv_layers if layer.kind == FULL]
    assert {(layer.rope_type, layer.rotary_fraction, layer.kv_heads) for layer in full} == {("proportional", 0.25, 1)}
    assert read_facts(tiny_family_config("llama")).layers[0].rope_type == "llama3"
    assert read_facts(tiny_family_config("qwen3_5_text")).layers[3].rotary_fraction == 0.25


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_unknown_family_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(ConfigError) as e:
        read_facts(GPT2Config(n_layer=1, n_embd=32, n_head=2))
    msg = _one_line(e)
    assert "'gpt2' is not supported" in msg and all(f in msg for f in ("llama", "gemma4", "qwen3_5", "smollm3"))


@pytest.mark.parametrize("model_type", ["deepseek_v3", "mistral4"])
def test_mla_models_are_refused_with_the_reason(model_type):
    from transformers import AutoConfig

    with pytest.raises(ConfigError) as e:
        read_facts(AutoConfig.for_model(model_type))
    msg = _one_line(e)
    assert "kv_lora_rank" in msg and "latent, not per-head K/V" in msg and model_type in msg


def test_unsupported_features_are_named():
    with pytest.raises(ConfigError) as e:
        read_facts(tiny_family_config("gemma3_text", use_bidirectional_attention=True))
    assert "bidirectional" in _one_line(e)
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
    cfg.layer_types = ["full_attention", "indexed_attention"]  # DeepSeek-V3.2's sparse attention
    with pytest.raises(ConfigError) as e:
        read_facts(cfg)
    assert "layer type 'indexed_attention' (layer 1)" in _one_line(e)


def test_unsupported_family_fails_before_weights_load(tmp_path):
    """Only a config on disk: the family check refuses it before transformers looks for weights."""
    from transformers import AutoConfig

    from streamkv.lab.models.causal_lm import CausalLM

    AutoConfig.for_model("deepseek_v3", num_hidden_layers=1).save_pretrained(tmp_path / "mla")
    with pytest.raises(ConfigError, match="latent, not per-head K/V"):
        CausalLM(path=str(tmp_path / "mla")).load()
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="'gpt2' is not supported"):
        CausalLM(path=str(tmp_path / "gpt2")).load()


def _gguf_metadata_only(path, arch: str, **extra) -> None:
    """A GGUF file with a family's metadata (and one dummy tensor): enough for transformers to read its config."""
    import gguf
    import numpy as np

    meta = {"context_length": 256, "block_count": 6, "feed_forward_length": 64, "embedding_length": 64,
            "attention.head_count": 4, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-6,
            "vocab_size": 128, "attention.key_length": 16, **extra}
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta.items():
        (w.add_float32 if isinstance(v, float) else w.add_uint32)(f"{arch}.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF = {  # the families transformers loads from GGUF: arch -> (extra metadata, expected kinds)
    "llama": ({}, {FULL}),
    "mistral": ({}, {SLIDING}),
    "qwen2": ({}, {FULL}),
    "qwen3": ({}, {FULL}),
    "phi3": ({}, {FULL}),
    "gemma2": ({"attention.sliding_window": WINDOW}, {SLIDING, FULL}),
    "gemma3": ({"attention.sliding_window": WINDOW}, {SLIDING, FULL}),
    "gemma4": ({"attention.sliding_window": WINDOW, "attention.key_length": 32}, {SLIDING, FULL}),
}


@pytest.mark.parametrize("arch", list(GGUF))
def test_gguf_route_gives_the_family_facts(arch, tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoConfig

    extra, kinds = GGUF[arch]
    _gguf_metadata_only(tmp_path / f"{arch}.gguf", arch, **extra)
    facts = read_facts(AutoConfig.from_pretrained(tmp_path, gguf_file=f"{arch}.gguf"))
    assert facts.family == arch and set(facts.kinds) == kinds and facts.max_positions == 256


# -- the compressed cache on every family ------------------------------------------------------------

Q8 = {"name": "uniform", "key_bits": 8, "value_bits": 8, "key_group_size": 16, "value_group_size": 16}
Q4 = {**Q8, "key_bits": 4, "value_bits": 4}
GROUP = 16
PROMPT = 50  # > WINDOW: the sliding layers drop tokens


def feed(model, ids, cache, chunk):
    with torch.inference_mode():
        out = [model(input_ids=ids[:, s : s + chunk], cache=cache, use_cache=True).logits for s in range(0, ids.shape[1], chunk)]
    return torch.cat(out, 1)


def prompt(n=PROMPT, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, n), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_uncompressed_logits_equal_dynamic_cache(family, one_thread):
    """quantizer=none: identical logits to transformers' own cache for the same config, with chunks
    smaller and larger than the sliding window."""
    model = tiny_family_model(family)
    ids = prompt()
    for chunk in (5, 20):
        cache = CompressedCache.for_model(model, build_compression())
        ours = feed(model, ids, cache, chunk)
        assert torch.equal(ours, feed(model, ids, DynamicCache(config=model.config), chunk)), chunk
        for layer in cache.layers:  # uncompressed, a sliding layer keeps what transformers' keeps: window - 1
            if getattr(layer, "is_sliding", False):
                assert layer.held_tokens == WINDOW - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_8_bit_greedy_generation_equals_uncompressed(family, one_thread):
    model = tiny_family_model(family)
    ids = prompt(40)
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=10, do_sample=False)
        cache = CompressedCache.for_model(model, build_compression(Q8, "fixed", "ema_relative"), chunk_size=GROUP)
        ours = model.generate(ids, max_new_tokens=10, do_sample=False, cache=cache, prefill_chunk_size=GROUP)
    assert torch.equal(ours, ref)
    assert cache.stats()["tokens"] == 49  # the last generated token is never fed back


SLIDING_FAMILIES = [f for f in FAMILIES if any(layer.kind == SLIDING for layer in read_facts(tiny_family_config(f)).layers)]


@pytest.mark.parametrize("family", SLIDING_FAMILIES)
def test_sliding_layers_hold_the_window_and_one_group(family, one_thread):
    """At 4 bits, a sliding layer frees every group that falls wholly out of the window: through
    prefill and decoding it never holds more than window + one group of tokens, and says so in bytes."""
    model = tiny_family_model(family)
    cache = CompressedCache.for_model(model, build_compression(Q4, "fixed", "ema_relative"), chunk_size=GROUP)
    sliding = [layer for layer in cache.layers if getattr(layer, "is_sliding", False)]
    ids = prompt(80)
    feed(model, ids[:, :48], cache, GROUP)
    for t in range(48, 80):  # decoding, one token at a time
        feed(model, ids[:, t : t + 1], cache, 1)
        assert all(layer.held_tokens <= WINDOW + GROUP for layer in sliding)
    stats = cache.stats()
    rows = stats["per_layer"]
    slide = [r for r in rows if r["kind"] == SLIDING]
    full = [r for r in rows if r["kind"] == FULL]
    assert slide and all(r["tokens"] <= WINDOW + GROUP for r in slide)
    assert all(r["tokens"] == 80 for r in full)
    assert stats["kv_bytes_by_layer_type"][SLIDING] == sum(r["kv_bytes"] for r in slide)
    assert stats["kv_bytes"] == sum(t.nbytes for t in cache.tensors()) == sum(stats["kv_bytes_by_layer_type"].values())
    per_token = [r["kv_bytes"] / r["tokens"] for r in rows]
    assert max(per_token) < 1.5 * min(per_token)  # a sliding layer's bytes are those of the tokens it holds
    # the mask lines up with what is held: 8 bits stay close to the uncompressed model, and the dense
    # reader (the model's own attention on the materialised window) agrees with the backend that read it
    ref = feed(model, ids, DynamicCache(config=model.config), GROUP)
    comp = build_compression(Q8, "fixed", "ema_relative")
    ours = feed(model, ids, CompressedCache.for_model(model, comp, chunk_size=GROUP), GROUP)
    torch.testing.assert_close(ours, ref, atol=0.08, rtol=0)
    from streamkv.kv.attention import DenseBackend

    comp.attention = DenseBackend()
    torch.testing.assert_close(feed(model, ids, CompressedCache.for_model(model, comp, chunk_size=GROUP), GROUP), ours, atol=1e-4, rtol=0)


def _model_rotation(model, rot, layer, x, start):
    """``x`` (1, heads, tokens, dim) rotated by the model's own ``apply_rotary_pos_emb`` at ``start``."""
    import inspect
    import sys

    apply = sys.modules[type(model).__module__].apply_rotary_pos_emb
    pos = torch.arange(start, start + x.shape[-2])[None]
    cos, sin = rot(x, pos, *((layer.rope_key,) if takes_layer_type(rot) else ()))
    # transformers >= 5.25 wraps it in a `kernels` module (hub kernels hook in there): read forward's signature
    params = list(inspect.signature(apply.forward if isinstance(apply, torch.nn.Module) else apply).parameters)
    if params[:2] == ["q", "k"]:
        return apply(x, x, cos, sin, unsqueeze_dim=1)[1]
    return apply(x, cos, sin, unsqueeze_dim=1)  # Gemma-4: one tensor at a time


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_undo_redo_round_trips_per_layer_type(family):
    """Each rotary layer type's table rotates exactly as the model does (local vs global base, partial
    and proportional rotary, llama3 scaling) and undoes it; NoPE layers have no table."""
    model = tiny_family_model(family)
    rot = rotary_module(model)
    facts = facts_of(model)
    comp = build_compression({**Q8, "pre_rope": True})
    cache = CompressedCache.for_model(model, comp, chunk_size=GROUP)
    torch.manual_seed(0)
    seen = set()
    for lf in facts.kv_layers:
        layer = cache.layers[lf.index]
        if not lf.rope:
            assert layer.rope is None
            continue
        assert isinstance(layer.rope, RopeTable) and layer.rope.layer_type == lf.rope_key
        if lf.rope_key in seen:
            continue
        seen.add(lf.rope_key)
        x = torch.randn(1, lf.kv_heads, 24, lf.head_dim)
        want = _model_rotation(model, rot, lf, x, 37)
        torch.testing.assert_close(layer.rope.rotate(x, 37), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.rope.unrotate(want, 37), x, atol=1e-5, rtol=1e-5)
        y = x.clone()
        torch.testing.assert_close(layer.rope.rotate_(y, 37), want, atol=1e-5, rtol=1e-5)
        assert layer.rope.width == lf.rotary_dim
    tables = {id(cache.layers[lf.index].rope) for lf in facts.kv_layers if lf.rope}
    assert len(tables) == len({lf.rope_key for lf in facts.kv_layers if lf.rope})  # one table per layer type


def test_linear_attention_layers_are_transformers_own():
    from transformers.cache_utils import LinearAttentionLayer

    model = tiny_family_model("qwen3_5_text")
    cache = CompressedCache.for_model(model, build_compression(Q8), chunk_size=GROUP)
    ref = DynamicCache(config=model.config)
    assert [type(a) for a in cache.layers[:3]] == [type(b) for b in ref.layers[:3]] == [LinearAttentionLayer] * 3
    feed(model, prompt(20), cache, GROUP)
    stats = cache.stats()
    assert stats["state_bytes"] > 0 and [r["layer"] for r in stats["per_layer"]] == [3]


def test_gemma4_shared_kv_layers_hold_nothing():
    from transformers.cache_utils import DummyLayer

    model = tiny_family_model("gemma4_text")
    cache = CompressedCache.for_model(model, build_compression(Q8), chunk_size=GROUP)
    assert [type(layer) for layer in cache.layers[4:]] == [DummyLayer, DummyLayer]


def test_group_sizes_are_checked_against_every_head_dim():
    """Gemma-4: head_dim 16 on sliding layers, 32 on global ones; one configuration must fit both."""
    model = tiny_family_model("gemma4_text")
    CompressedCache.for_model(model, build_compression(Q8), chunk_size=GROUP)
    with pytest.raises(ConfigError, match="value_group_size=32 does not divide head_dim=16"):
        CompressedCache.for_model(model, build_compression({**Q8, "value_group_size": 32}), chunk_size=GROUP)


def test_dynamic_rope_refuses_pre_rope_storage_only():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_family_config("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ConfigError) as e:
        CompressedCache.for_model(model, build_compression({**Q8, "pre_rope": True}), chunk_size=GROUP)
    assert "'dynamic' RoPE" in _one_line(e) and "pre_rope=false" in str(e.value)
    CompressedCache.for_model(model, build_compression({**Q8, "pre_rope": False}), chunk_size=GROUP)


def test_soft_capped_attention_stays_with_the_model():
    """Gemma-2's logit soft-capping lives in its own attention: auto reads dense, fused is refused."""
    from streamkv.kv.attention import FusedBackend

    model = tiny_family_model("gemma2")
    assert CompressedCache.for_model(model, build_compression(Q8), chunk_size=GROUP).backend.name == "dense"
    comp = build_compression(Q8)
    comp.attention = FusedBackend()
    with pytest.raises(ConfigError, match="soft-capping"):
        CompressedCache.for_model(model, comp, chunk_size=GROUP)


def test_seed_api_for_any_family(tmp_path, one_thread):
    """``streamkv.compress`` and ``CompressedModelForCausalLM.from_pretrained`` on a non-Llama family."""
    import streamkv

    config = CompressionConfig(chunk_size=GROUP, key_bits_normal=8, value_bits_normal=8,
                               quantizer_options={"key_group_size": GROUP, "value_group_size": GROUP})
    model = tiny_family_model("gemma3_text")
    ids = prompt(40)
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False)
        wrapped = streamkv.compress(model, config)
        assert torch.equal(wrapped.generate(ids, max_new_tokens=6, do_sample=False), ref)
    stats = wrapped.get_compression_stats()
    assert stats["kv_bytes"] > 0 and set(stats["kv_bytes_by_layer_type"]) == {SLIDING, FULL}
    assert wrapped.config is model.config and wrapped(input_ids=ids[:, :4]).logits.shape == (1, 4, 128)
    model.save_pretrained(tmp_path / "g3")
    loaded = streamkv.CompressedModelForCausalLM.from_pretrained(tmp_path / "g3", compression_config=config)
    with torch.inference_mode():
        assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False), ref)


def test_evicted_tokens_leave_their_outliers_behind():
    from streamkv.kv.storage.sparse import SparseOutliers

    torch.manual_seed(0)
    sparse = SparseOutliers(8, rows=2, dim=4)
    blocks = [torch.randn(2, 16, 4) for _ in range(3)]
    masks = [torch.rand(2, 16, 4) < 0.1 for _ in range(3)]
    for x, m in zip(blocks, masks):
        sparse.append(x, m)
    dense = torch.zeros(2, 48, 4)
    sparse.scatter_into(dense)
    sparse.drop_tokens(16)
    assert sparse.tokens == 32 and sparse.count == int(masks[1].sum() + masks[2].sum())
    after = torch.zeros(2, 32, 4)
    sparse.scatter_into(after)
    assert torch.equal(after, dense[:, 16:])
    assert sparse.chunk_counts.tolist() == [int(masks[1].sum()), int(masks[2].sum())]
