"""Every supported family, on a tiny random model built offline from its config (see conftest.TINY_FAMILIES).

The model facts read from each family's config; one-line errors for unsupported families and features;
the pre-load family check; the GGUF route's configs.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_FAMILIES, WINDOW, tiny_family_config, tiny_family_model
from streamkv import ConfigError
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

    from streamkv.models.causal_lm import CausalLM

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
