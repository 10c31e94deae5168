"""Attention backends against the dense reference: every storage option, both key layouts, decode and
chunked prefill; the online-softmax merge; the engine's independence from the lab."""

from __future__ import annotations

import pytest
import torch

from streamkv import CompressedCache, ConfigError
from streamkv.kv.attention import DenseBackend, FusedBackend, SplitBackend, TritonBackend
from streamkv.kv.attention.online_softmax import Partial, merge_all
from streamkv.lab.compression import build_compression

Q = {"key_group_size": 16, "value_group_size": 16}
QUANTIZERS = {
    "uniform_rotated_pre_rope": {"name": "uniform", "rotate_keys": True, "rotate_values": True, **Q},
    "uniform_rotated_post_rope": {"name": "uniform", "rotate_keys": True, "rotate_values": True, "pre_rope": False, **Q},
    "uniform_3bit_plain": {"name": "uniform", "key_bits": 3, "value_bits": 2, "pre_rope": False, **Q},
    "uniform_token_keys": {"name": "uniform", "key_axis": "token", "value_axis": "channel", "pre_rope": False, **Q},
    "uniform_residual": {"name": "uniform", "residual_length": 20, "pre_rope": False, "rotate_keys": True, **Q},
    "nonuniform": {"name": "nonuniform", "pre_rope": False, **Q},
    "int_per_token": {"name": "int_per_token", "key_bits": 8, "value_bits": 2},
    "lloyd_max": {"name": "lloyd_max", "key_bits": 3, "value_bits": 2, **Q},
    "lloyd_max_budget_per_head": {"name": "lloyd_max", "budget_bits": 5.0, **Q},
}
SINKS = {"none": "none", "fixed8": "fixed", "fixed16": {"name": "fixed", "size": 3, "key_bits": 16, "value_bits": 16}}
OUTLIERS = {"none": "none", "ema": {"name": "ema_relative", "values": True}, "topk": {"name": "topk", "fraction": 0.02}}


def run(model, comp, ids, chunk: int, decode: int):
    """Logits of ``ids`` streamed in ``chunk``s, then ``decode`` single-token steps."""
    cache = CompressedCache.for_model(model, comp, chunk_size=chunk)
    n = ids.shape[1] - decode
    out = []
    with torch.inference_mode():
        for s in range(0, n, chunk):
            out.append(model(input_ids=ids[:, s : min(n, s + chunk)], cache=cache, use_cache=True).logits)
        for s in range(n, ids.shape[1]):
            out.append(model(input_ids=ids[:, s : s + 1], cache=cache, use_cache=True).logits)
    return torch.cat(out, 1)


def backends_agree(model, q, sink, outlier, ids, chunk=32, decode=6, kernel=True):
    ref = run(model, build_compression(q, sink, outlier, DenseBackend()), ids, chunk, decode)
    ours = run(model, build_compression(q, sink, outlier, FusedBackend(cpu_kernel=kernel)), ids, chunk, decode)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)  # float32 reassociation only
    return ref


@pytest.mark.parametrize("quantizer", QUANTIZERS)
@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("outlier", OUTLIERS)
def test_fused_equals_dense(tiny_llama, quantizer, sink, outlier, one_thread):
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (1, 112))
    backends_agree(tiny_llama, QUANTIZERS[quantizer], SINKS[sink], OUTLIERS[outlier], ids)


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu_kernel", "tensor_path"])
def test_fused_equals_dense_in_batches_mqa_and_long_prefill_blocks(tiny64, kernel, one_thread):
    """Batch > 1, one KV head (MQA), head_dim 64, a prefill long enough to be read in several blocks;
    key groups of 64 tokens, so the CPU kernel reads whole tiles (the grid above covers partial ones)."""
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 300))
    q = {"name": "uniform", "rotate_keys": True, "rotate_values": True, "key_group_size": 64}
    ref = run(tiny64, build_compression(q, "fixed", "ema_relative", DenseBackend()), ids, 96, 8)
    fused = FusedBackend(block_tokens=64, cpu_kernel=kernel)
    ours = run(tiny64, build_compression(q, "fixed", "ema_relative", fused), ids, 96, 8)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)


def spy(monkeypatch, module, name: str) -> list:
    """The first argument of every call of ``module.name``, recorded (the call goes through)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda first, *a: calls.append(first) or real(first, *a))
    return calls


def test_decoding_on_the_cpu_reads_the_default_storage_with_the_kernel(tiny64, monkeypatch, one_thread):
    """The default layout (Hadamard-rotated keys stored before RoPE, with outliers) takes the one-pass
    kernel in decoding, the whole step in compiled code (residual and own tokens included), rather
    than quietly falling back to the tensor path."""
    from streamkv.kv.attention import cpu

    if not cpu.available():
        pytest.skip("numba is not installed")
    read, steps = spy(monkeypatch, cpu, "_read"), spy(monkeypatch, cpu, "decode")
    ids = torch.randint(0, 96, (1, 200))
    q = {"name": "uniform", "key_group_size": 64, "rotate_keys": True, "rotate_values": True}  # conf/quantizer/uniform.yaml
    backends_agree(tiny64, q, "fixed", "ema_relative", ids, chunk=64, decode=3)
    body = [s for s in read if s.key_rope is not None and s.key_hadamard and s.key_outliers is not None]
    assert len(body) >= 3 * 2  # every decoding step, both layers (and the short last prefill chunk)
    assert len(steps) >= 3 * 2 and any(v.segments[-1].key_rope is None for v in steps)  # with a residual too


@pytest.mark.parametrize("preset", ["lloyd_max_budget", "lloyd_max_budget_per_layer", "lloyd_max_fixed",
                                    "lloyd_max_3bit_token_values"])
def test_decoding_on_the_cpu_reads_the_presets_storage_with_the_kernel(tiny64, preset, monkeypatch, one_thread):
    """The budgeted presets' storage (Lloyd-Max values, log-scale scales, widths that change between
    chunks and differ per KV head: time Segments and RowSplits) is read by the compiled decoding step,
    piece by piece, and equals the dense read; no segment falls back to the tensor path."""
    from streamkv.kv.attention import cpu, fused
    from streamkv.kv.storage.composite import RowSplit, Segments

    if not cpu.available():
        pytest.skip("numba is not installed")
    steps, tensor_path = spy(monkeypatch, cpu, "decode"), spy(monkeypatch, fused, "_scores")
    q = {"name": "lloyd_max", "key_group_size": 64, "value_group_size": 32}
    q.update({"lloyd_max_budget": {"budget_bits": 4.6, "widths": [2, 3, 4, 8]},
              "lloyd_max_budget_per_layer": {"budget_bits": 3.6, "granularity": "layer"},
              "lloyd_max_fixed": {"key_bits": 3, "value_bits": 2},
              # one group per token: the values' whole-token fast path, at its three-bit width
              "lloyd_max_3bit_token_values": {"key_bits": 4, "value_bits": 3, "value_group_size": 64}}[preset])
    torch.manual_seed(4)
    ids = torch.randint(0, 96, (2, 330))
    backends_agree(tiny64, q, "fixed", "ema_relative", ids, chunk=64, decode=4)
    seen = {type(getattr(s.keys, "inner", s.keys)).__name__ for v in steps for s in v.segments} | {
        type(getattr(s.values, "inner", s.values)).__name__ for v in steps for s in v.segments}
    decoded = {id(x) for v in steps for x in v.segments}
    assert steps and not [s for s in tensor_path if id(s) in decoded]
    if preset.startswith("lloyd_max_budget"):
        assert seen & {Segments.__name__, RowSplit.__name__}, seen  # composites did reach the kernel


@pytest.mark.parametrize("backend", [FusedBackend, SplitBackend])
def test_kernel_decoding_with_left_padding_equals_dense(tiny64, backend, one_thread):
    """Batch 2 with one row left-padded: the mask reaches the compiled decoding step (segments, the
    residual and the own tokens) and, under ``auto``, the masked prefill read; padded positions stay
    out of every softmax."""
    torch.manual_seed(3)
    ids = torch.randint(0, 96, (2, 150))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    q = {"name": "uniform", "key_group_size": 64, "rotate_keys": True, "rotate_values": True}

    def feed(backend):
        cache = CompressedCache.for_model(tiny64, build_compression(q, "fixed", "ema_relative", backend), chunk_size=64)
        bounds = [(0, 64), (64, 128), (128, 146)] + [(s, s + 1) for s in range(146, 150)]
        with torch.inference_mode():
            return torch.cat([tiny64(input_ids=ids[:, s:e], attention_mask=mask[:, :e], cache=cache, use_cache=True).logits
                              for s, e in bounds], 1)

    torch.testing.assert_close(feed(backend()), feed(DenseBackend()), atol=2e-4, rtol=0)


def test_auto_on_the_cpu_equals_dense(tiny_llama, monkeypatch, one_thread):
    """``auto`` on the CPU: the fused kernel in decoding, the dense read + SDPA for prefill chunks
    (unpadded: the history unmasked and the own tokens causal, merged by their log-sum-exp)."""
    from streamkv.kv.attention import auto as split

    calls = []
    unmasked = split._history_then_own
    monkeypatch.setattr(split, "_history_then_own", lambda *a: calls.append(1) or unmasked(*a))
    torch.manual_seed(2)
    ids = torch.randint(0, 96, (2, 120))
    q = QUANTIZERS["uniform_rotated_pre_rope"]
    ref = run(tiny_llama, build_compression(q, "fixed", "ema_relative", DenseBackend()), ids, 32, 6)
    ours = run(tiny_llama, build_compression(q, "fixed", "ema_relative", SplitBackend()), ids, 32, 6)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)
    assert len(calls) >= 2 * 2  # the prefill chunks after the first, both layers


def test_fused_greedy_generation_equals_dense_at_8_bits(tiny_llama, one_thread):
    q = {"name": "uniform", "key_bits": 8, "value_bits": 8, "rotate_keys": True, "rotate_values": True, "pre_rope": False, **Q}
    ids = torch.randint(0, 96, (1, 64))
    out = {}
    for name, backend in (("dense", DenseBackend()), ("fused", FusedBackend())):
        cache = CompressedCache.for_model(tiny_llama, build_compression(q, "fixed", "ema_relative", backend), chunk_size=32)
        out[name] = tiny_llama.generate(ids, cache=cache, max_new_tokens=12, do_sample=False, prefill_chunk_size=32)
    assert torch.equal(out["dense"], out["fused"])


def test_auto_is_fused_on_cpu_and_the_model_attends_through_streamkv(tiny_llama):
    cache = CompressedCache.for_model(tiny_llama, build_compression(QUANTIZERS["uniform_rotated_post_rope"]), chunk_size=32)
    assert isinstance(cache.backend, SplitBackend) and isinstance(cache.backend.decode, FusedBackend)
    assert tiny_llama.config._attn_implementation == "streamkv"
    plain = CompressedCache.for_model(tiny_llama, build_compression())  # uncompressed: the exact dense path
    assert isinstance(plain.backend, DenseBackend)


def test_triton_without_cuda_is_refused_in_one_line(tiny_llama, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError) as e:
        CompressedCache.for_model(tiny_llama, build_compression(QUANTIZERS["uniform_rotated_post_rope"], attention=TritonBackend()), chunk_size=32)
    msg = str(e.value)
    assert "\n" not in msg and "attention=triton" in msg and "fused" in msg


def test_online_softmax_merge_equals_softmax_over_the_concatenation():
    torch.manual_seed(0)
    scores = torch.randn(3, 5, 40) * 4
    scores[:, :, 30:] = float("-inf")  # a fully masked part contributes nothing
    values = torch.randn(3, 40, 8)
    parts = []
    for a, b in ((0, 7), (7, 30), (30, 40)):
        part, p = Partial.of(scores[..., a:b])
        part.acc = [p @ values[:, a:b], None]
        parts.append(part)
    out, _ = merge_all(parts).output()
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ values, atol=1e-6, rtol=1e-5)


def test_the_chunks_history_and_own_parts_merge_as_one_masked_attention():
    """The CPU prefill path (history unmasked, own tokens causal, merged by log-sum-exp) equals one
    SDPA call over both with the causal mask."""
    from streamkv.kv.attention.auto import _history_then_own
    from streamkv.kv.attention.view import KVSegment, LayerView
    from streamkv.kv.compat import has_attention_with_lse
    from streamkv.kv.storage.raw import Raw

    torch.manual_seed(0)
    b, h, g, n, ql, d = 1, 3, 3, 40, 12, 16
    query = torch.randn(b, h * g, ql, d)
    if not has_attention_with_lse(query):
        pytest.skip("no log-sum-exp SDPA here")
    hk, hv, k, v = (torch.randn(b * h, t, d) for t in (n, n, ql, ql))
    view = LayerView([KVSegment(0, Raw(hk), Raw(hv))], k, v, b, h)
    out = _history_then_own(view, query, d**-0.5)
    keys = torch.cat([hk, k], 1).view(b, h, n + ql, d)
    values = torch.cat([hv, v], 1).view(b, h, n + ql, d)
    mask = torch.ones(ql, n + ql, dtype=torch.bool).tril(n)
    ref = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=d**-0.5, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)
