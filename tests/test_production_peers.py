"""Production peers as registered quantizers on the streaming protocol: vLLM's TurboQuant presets and its
fp8 cache. Their sizes are counted from what they hold; every reader reads them."""

from __future__ import annotations

import math

import pytest
import torch

from streamkv import CompressedCache, ConfigError
from streamkv.kv.attention import DenseBackend, FusedBackend
from streamkv.kv.quantizers.turboquant import PRESETS
from streamkv.kv.storage.codebook import LloydMaxQuantized
from streamkv.kv.storage.fp8 import Fp8
from streamkv.kv.storage.packed import Quantized
from streamkv.kv.storage.raw import Raw
from streamkv.kv.storage.rotated import Rotated
from streamkv.kv.storage.turboquant import quantize_unit_norm
from streamkv.kv.transforms.hadamard import hadamard
from streamkv.lab.compression import build_compression

pytestmark = pytest.mark.usefixtures("one_thread")

D, LAYERS, ROWS = 64, 6, 1  # head_dim, layers, batch x KV heads of the tiny model


@pytest.fixture(scope="module")
def tiny6():
    """A 6-layer random Llama, head_dim 64, 2 query heads on 1 KV head (2 quantized middle layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def run(model, comp, n=80, chunk=32, decode=0):
    """The cache and the logits of ``n`` random tokens streamed in ``chunk``s, then ``decode`` single steps."""
    ids = torch.randint(0, 128, (1, n + decode), generator=torch.Generator().manual_seed(0))
    cache = CompressedCache.for_model(model, comp, chunk_size=chunk)
    out = []
    with torch.inference_mode():
        for s in range(0, n, chunk):
            out.append(model(input_ids=ids[:, s : min(n, s + chunk)], cache=cache, use_cache=True).logits)
        for s in range(n, n + decode):
            out.append(model(input_ids=ids[:, s : s + 1], cache=cache, use_cache=True).logits)
    return cache, torch.cat(out, 1)


def turboquant(preset, attention="auto"):
    return build_compression({"name": "turboquant", "preset": preset}, "none", "none", attention)


# -- TurboQuant -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_turboquant_bits_counted_equal_bytes_held(tiny6, preset):
    kbits, vbits, _ = PRESETS[preset]
    cache, _ = run(tiny6, turboquant(preset))
    tokens = 80
    for layer in cache.layers[2:4]:  # the quantized middle layers
        k, v = layer.k.body, layer.v.body
        assert isinstance(v, Quantized) and v.axis == "token" and v.group_size == D and v.bits == vbits
        # vLLM's slot: value = ceil(d * bits / 8) + 4 (fp16 scale + zero); key = ceil(d * bits / 8) + 2 (fp16 norm) or d (fp8)
        assert v.nbytes == ROWS * tokens * (math.ceil(D * vbits / 8) + 4)
        if kbits == 8:
            assert isinstance(k, Fp8) and k.data.dtype == torch.float8_e4m3fn and float(k.scale) == 1.0
            assert k.nbytes == ROWS * tokens * D + 4  # + the one float32 scale (1.0) of the layer
        else:
            assert isinstance(k, Rotated) and isinstance(k.inner, LloydMaxQuantized) and k.inner.bits == kbits
            assert k.inner.scale.dtype == torch.float16 and k.inner.zero.numel() == 0
            assert k.nbytes == ROWS * tokens * (math.ceil(D * kbits / 8) + 2)
    stats = cache.stats()
    held = sum(t.nbytes for layer in cache.layers for s in (layer.k, layer.v) for ts in s.parts().values() for t in ts)
    assert stats["kv_bytes"] == held
    row = stats["per_layer"][2]
    key_bits = 8 + 32 / (tokens * D) if kbits == 8 else kbits + 16 / D
    assert row["avg_key_bits"] == pytest.approx(key_bits) and row["avg_value_bits"] == pytest.approx(vbits + 32 / D)


def test_turboquant_first_and_last_two_layers_hold_full_precision(tiny6):
    cache, _ = run(tiny6, turboquant("3bit_nc"))
    raw = [isinstance(layer.k.body, Raw) and isinstance(layer.v.body, Raw) for layer in cache.layers]
    assert raw == [True, True, False, False, True, True]
    assert all(layer.k.body.data.dtype == torch.float16 for i, layer in enumerate(cache.layers) if raw[i])
    rows = cache.stats()["per_layer"]
    assert [r["avg_key_bits"] == r["avg_value_bits"] == 16.0 for r in rows] == raw  # the stats say so
    # vLLM's rule: at most half the layers at each end; edge_layers=0 quantizes them all
    q = turboquant("4bit_nc").quantizer
    assert [q.is_edge(i, 3) for i in range(3)] == [True, False, True] and all(q.is_edge(i, 4) for i in range(4))
    none = build_compression({"name": "turboquant", "edge_layers": 0}, "none", "none")
    cache, _ = run(tiny6, none, n=32)
    assert not any(isinstance(layer.k.body, Raw) for layer in cache.layers)


def test_turboquant_rotation_is_vllms_orthonormal_hadamard():
    # vLLM's _build_hadamard: Sylvester construction divided by sqrt(d), no random signs, shared by all layers
    h = torch.tensor([[1.0]])
    while h.shape[0] < D:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    vllm = h / math.sqrt(D)
    torch.testing.assert_close(hadamard(D), vllm)
    torch.testing.assert_close(hadamard(D) @ hadamard(D).T, torch.eye(D), atol=1e-6, rtol=0)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    block = quantize_unit_norm(x, 4)
    inner = block.inner.dequantize(torch.float32)  # the stored (rotated) domain
    torch.testing.assert_close(block.dequantize(torch.float32), inner @ vllm.T)
    torch.testing.assert_close(inner.norm(dim=-1), block.dequantize(torch.float32).norm(dim=-1))  # rotation keeps norms


def test_turboquant_codebooks_are_the_published_lloyd_max_levels():
    known = {  # Max (1960): Lloyd-Max quantizers of N(0, 1), positive half
        2: [0.4528, 1.5104],
        3: [0.2451, 0.7560, 1.3440, 2.1520],
        4: [0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6180, 2.0690, 2.7326],
    }
    x = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(2))
    for bits, half in known.items():
        lut = quantize_unit_norm(x, bits).inner.lut
        want = torch.tensor([-v for v in reversed(half)] + half)
        torch.testing.assert_close(lut, want, atol=2e-4, rtol=0)


def test_norm_correction_preserves_each_vectors_norm(tiny6):
    x = torch.randn(3, 40, D, generator=torch.Generator().manual_seed(3)) * torch.rand(3, 40, 1) * 20
    norm = x.norm(dim=-1)
    for bits in (3, 4):
        with_nc = quantize_unit_norm(x, bits, norm_correction=True).dequantize(torch.float32).norm(dim=-1)
        without = quantize_unit_norm(x, bits, norm_correction=False).dequantize(torch.float32).norm(dim=-1)
        assert ((with_nc / norm - 1).abs() < 1e-3).all()  # fp16 rounding of the stored number only
        assert (without / norm - 1).abs().max() > 5e-3  # the plain centroids do not keep it
    # in the cache: the keys of a quantized layer read back with their norms (post-RoPE, as stored)
    q = turboquant("k3v4_nc").quantizer.for_stream(LAYERS)
    block = q.encode_keys(x, layer=2)
    got = block.dequantize(torch.float32).norm(dim=-1)
    assert ((got / norm - 1).abs() < 1e-3).all() and isinstance(q.encode_keys(x, layer=5), Raw)


@pytest.mark.parametrize("preset", PRESETS)
def test_turboquant_dense_equals_fused_logits(tiny6, preset):
    _, ref = run(tiny6, turboquant(preset, DenseBackend()), decode=3)
    _, fused = run(tiny6, turboquant(preset, FusedBackend()), decode=3)  # decode steps: the CPU kernel
    _, tensor = run(tiny6, turboquant(preset, FusedBackend(cpu_kernel=False)), decode=3)
    torch.testing.assert_close(fused, ref, atol=2e-4, rtol=0)
    torch.testing.assert_close(tensor, ref, atol=2e-4, rtol=0)


def test_a_bad_preset_fails_in_one_line_listing_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        build_compression({"name": "turboquant", "preset": "k2v2"})
    msg = str(e.value)
    assert "\n" not in msg and "quantizer.preset='k2v2'" in msg
    assert all(p in msg for p in PRESETS)
    for alias in ("turboquant_k8v4", "k8v4", "84", 84):  # vLLM's spelling, ours, the bench's key-value code
        assert build_compression({"name": "turboquant", "preset": alias}).quantizer.preset == "k8v4"
    with pytest.raises(ConfigError, match=r"quantizer.edge_bits=4 is not allowed"):
        build_compression({"name": "turboquant", "edge_bits": 4})


# -- fp8 ------------------------------------------------------------------------------------------------
def test_fp8_holds_one_byte_per_element_and_one_scale_per_layer_and_kind(tiny6):
    cache, _ = run(tiny6, build_compression("fp8"))
    for layer in cache.layers:
        for s in (layer.k, layer.v):
            assert isinstance(s.body, Fp8) and s.body.data.dtype == torch.float8_e4m3fn
            assert s.body.scale.dtype == torch.float32 and float(s.body.scale) == 1.0  # vLLM's default
            assert s.body.nbytes == ROWS * 80 * D + 4
    stats = cache.stats()
    assert stats["kv_bytes"] == LAYERS * 2 * (ROWS * 80 * D + 4)
    assert stats["avg_bits"] == pytest.approx(8 + 32 / (80 * D))


def test_fp8_saturates_and_calculated_scales_are_per_sequence():
    from streamkv.kv.storage.fp8 import quantize_fp8

    x = torch.tensor([[[1.0, -1000.0, 3.3, 0.01]]])
    torch.testing.assert_close(quantize_fp8(x).dequantize(torch.float32), torch.tensor([[[1.0, -448.0, 3.25, 0.01]]]), atol=1e-3, rtol=0)
    q = build_compression({"name": "fp8", "scale": "calculate"}).quantizer
    a, b = q.for_stream(2), q.for_stream(2)
    k = a.encode_keys(x * 2, layer=1)
    assert float(k.scale) == pytest.approx(2000 / 200)
    assert float(a.encode_keys(x, layer=1).scale) == float(k.scale)  # frozen after the first chunk
    assert float(a.encode_values(x, layer=1).scale) == pytest.approx(1000 / 100)
    assert float(b.encode_keys(x, layer=1).scale) == pytest.approx(1000 / 200)  # another sequence, its own


def test_fp8_dense_equals_fused_logits(tiny6):
    _, ref = run(tiny6, build_compression("fp8", "none", "none", DenseBackend()), decode=3)
    _, fused = run(tiny6, build_compression("fp8", "none", "none", FusedBackend()), decode=3)
    torch.testing.assert_close(fused, ref, atol=2e-4, rtol=0)


# -- configs --------------------------------------------------------------------------------------------
def test_presets_compose_as_experiments_bench_widths_and_methods():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from streamkv.lab.bench.plan import compression_for, plan
    from streamkv.lab.paths import CONF_DIR

    def bench_config(overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return OmegaConf.to_object(compose(config_name="bench", overrides=overrides))

    for preset in PRESETS:
        comp, resolved = compression_for([f"experiment=turboquant_{preset}"])
        assert comp.quantizer.preset == preset and resolved["sink"].get("size", 0) == 0
        assert type(comp.outlier).__name__ == "NoOutliers" and comp.quantizer.edge_layers == 2
    jobs = plan(bench_config(["run=[turboquant,fp8]", "measure=[ppl]"]))
    assert [(j.method, j.bits) for j in jobs] == [("baseline", 32), ("turboquant", 84), ("turboquant", 44),
                                                  ("turboquant", 34), ("turboquant", 33), ("fp8", 8)]
    got = [compression_for(j.overrides)[0].quantizer for j in jobs[1:]]
    assert [(q.key_bits, q.value_bits, q.norm_correction) for q in got[:4]] == list(PRESETS.values())
    assert type(got[4]).__name__ == "Fp8Quantizer"
