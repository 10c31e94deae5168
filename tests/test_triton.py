"""The Triton backend against the dense reference: logits of a tiny random Llama fed chunk by chunk
through the compressed cache, then decoded token by token, must agree.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1`` is set
here, before triton is imported); with ``TRITON_INTERPRET=0`` in the environment and a CUDA GPU they
are compiled and run on it (``tools/gpu_check.sh``). Tolerance: float32 logits within 1e-4 absolute
(observed ~2e-7: only the summation order differs); bfloat16 within 2 ulps of the logits' scale.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ON_GPU = os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when a jit function is decorated, i.e. when its module is imported
    if "triton" in sys.modules and type(sys.modules["triton"].language.zeros).__name__ != "InterpretedFunction":
        # imported without the flag by an earlier test (the engine's imports reach torch._dynamo, which imports
        # triton): import triton's Python modules afresh (its compiled core stays loaded) and the kernels with them
        for name in [m for m in sys.modules if m.partition(".")[0] == "triton" and not m.startswith("triton._C")]:
            del sys.modules[name]
        sys.modules.pop("streamkv.kv.kernels.triton_attention", None)
pytest.importorskip("triton", reason="triton is not installed (the dev extra installs it on Linux)")

from streamkv import CompressedCache, Compression, ConfigError  # noqa: E402
from streamkv.kv.attention import AutoBackend, DenseBackend, FusedBackend, TritonBackend  # noqa: E402
from streamkv.kv.kernels import triton_attention  # noqa: E402

try:
    from streamkv.lab.compression import build_compression  # noqa: E402
except ImportError:  # the GPU image may lack Hydra: the same engine components, built directly

    def build_compression(quantizer="none", sink="none", outlier="none", attention="auto"):
        from streamkv.kv.outliers.ema_relative import EmaRelativeOutliers
        from streamkv.kv.outliers.none import NoOutliers
        from streamkv.kv.outliers.topk import TopKOutliers
        from streamkv.kv.quantizers.lloyd_max import LloydMaxQuantizer
        from streamkv.kv.quantizers.none import NoQuantizer
        from streamkv.kv.quantizers.nonuniform import NonUniformQuantizer
        from streamkv.kv.quantizers.per_token import IntPerTokenQuantizer
        from streamkv.kv.quantizers.uniform import UniformQuantizer
        from streamkv.kv.sinks.fixed import FixedSinks
        from streamkv.kv.sinks.none import NoSinks

        kinds = {"none": NoQuantizer, "uniform": UniformQuantizer, "nonuniform": NonUniformQuantizer, "lloyd_max": LloydMaxQuantizer,
                 "int_per_token": IntPerTokenQuantizer, "fixed": FixedSinks, "ema_relative": EmaRelativeOutliers,
                 "topk": TopKOutliers, "dense": DenseBackend, "fused": FusedBackend, "triton": TritonBackend, "auto": AutoBackend}
        none = {"sink": NoSinks, "outlier": NoOutliers}

        def make(spec, group):
            if not isinstance(spec, (str, dict)):
                return spec
            spec = {"name": spec} if isinstance(spec, str) else dict(spec)
            name = spec.pop("name")
            return (none[group] if name == "none" and group in none else kinds[name])(**spec)

        return Compression(make(quantizer, "q"), make(sink, "sink"), make(outlier, "outlier"), make(attention, "a"))


DEVICE = torch.device("cuda" if ON_GPU else "cpu")
ATOL = 1e-4

OUTLIERS = {"name": "ema_relative", "threshold": 2.0, "values": True}  # ~5% of keys and values: every tile has some
FP16_SINKS = {"name": "fixed", "size": 4, "key_bits": 16, "value_bits": 16}


def _uniform(kb, vb, **kw):
    return {"name": "uniform", "key_bits": kb, "value_bits": vb, "key_group_size": 16, "value_group_size": 8, "pre_rope": False, **kw}


ROT = dict(rotate_keys=True, rotate_values=True)

# (quantizer, sink, outlier, chunk, TritonBackend fields): every packed width, both key and value axes,
# Hadamard-rotated and plain storage (outliers add to either), pre- and post-RoPE keys,
# codebooks, ragged groups and tiles, residuals of 0 and of many tokens, one and several history splits
CASES = {
    "int2-kchannel-vtoken-rotated": (_uniform(2, 2, **ROT), "fixed", OUTLIERS, 16, dict(block_n=16, splits=3)),
    "int3-ktoken-vchannel-plain": (_uniform(3, 3, key_axis="token", value_axis="channel", key_group_size=8, value_group_size=16),
                                   FP16_SINKS, OUTLIERS, 16, dict(block_n=16)),
    "int4-prerope-rotated": ({**_uniform(4, 4, **ROT), "pre_rope": True}, "fixed", OUTLIERS, 16, dict(block_n=16, splits=2)),
    "int8-prerope-plain-ktoken": ({**_uniform(8, 8, key_axis="token", key_group_size=4), "pre_rope": True}, FP16_SINKS, OUTLIERS, 16,
                                  dict(block_n=32)),
    "nf3-codebook-prerope": ({"name": "nonuniform", "key_bits": 3, "value_bits": 2, "key_group_size": 16, "value_group_size": 0},
                             "fixed", OUTLIERS, 16, dict(block_n=16)),
    "int4-ragged-groups-and-tiles": (_uniform(4, 3, key_group_size=24, value_group_size=4, **ROT), "fixed", OUTLIERS, 24,
                                     dict(block_n=16, splits=2)),
    "lloyd-max-log8-keys-codebook": ({"name": "lloyd_max", "key_bits": 3, "value_bits": 2, "key_group_size": 16, "value_group_size": 0,
                                      "key_codebook": "lloyd_max"}, "fixed", OUTLIERS, 16, dict(block_n=16)),
    "lloyd-max-preset-layout": ({"name": "lloyd_max", "key_bits": 4, "value_bits": 3, "key_group_size": 16}, "fixed", "none", 16,
                                dict(block_n=16, splits=2)),
    "int2-residual-many": ({**_uniform(2, 4), "residual_length": 20}, "fixed", "none", 16, dict(block_n=16)),
    "int4-per-token-residual-0": ({"name": "int_per_token", "key_bits": 4, "value_bits": 2}, "none", "none", 16, dict(block_n=16)),
}


def feed(model, ids, comp, chunk, steps, attention_mask=None):
    """Logits of ``ids`` (batch, n): the first ``n - steps`` tokens in chunks, then one token at a time."""
    cache = CompressedCache.for_model(model, comp, chunk_size=chunk)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # older transformers
    n = ids.shape[1]
    bounds = [(s, min(s + chunk, n - steps)) for s in range(0, n - steps, chunk)] + [(s, s + 1) for s in range(n - steps, n)]
    out = []
    with torch.inference_mode():
        for s, e in bounds:
            kw = {cache_kw: cache} if attention_mask is None else {cache_kw: cache, "attention_mask": attention_mask[:, :e]}
            out.append(model(input_ids=ids[:, s:e], use_cache=True, **kw).logits)
    return torch.cat(out, 1), cache


def shallow(fn, *args):
    """``fn(*args)`` on a fresh thread: deep in pytest's stack, CPython 3.11 maps and unmaps a frame
    chunk on nearly every call the interpreter makes (most of this file's time otherwise)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def compare(model, case, ids, steps=4, attention_mask=None, dtype_atol=ATOL):
    q, sink, outlier, chunk, fields = case
    ref, _ = feed(model, ids, build_compression(q, sink, outlier, "dense"), chunk, steps, attention_mask)
    got, cache = shallow(feed, model, ids, build_compression(q, sink, outlier, TritonBackend(**fields)), chunk, steps, attention_mask)
    assert isinstance(cache.backend, TritonBackend)
    torch.testing.assert_close(got.float(), ref.float(), atol=dtype_atol, rtol=0)
    return cache


@pytest.fixture(scope="module")
def model(tiny_llama):
    """The tiny GQA Llama (4 query heads, 2 KV heads, head_dim 16) on the test device."""
    return copy.deepcopy(tiny_llama).to(DEVICE)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


def test_kernels_run_where_asked():
    if not ON_GPU:
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(triton_attention.attend_kernel, InterpretedFunction)
    assert TritonBackend.importable()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_dense(model, name):
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    ids = torch.randint(0, 128, (1, 52), generator=g).to(DEVICE)
    cache = compare(model, CASES[name], ids)
    layer = cache.layers[0]
    if CASES[name][2] != "none":  # the outlier paths really ran
        assert layer.k.outliers.count > 0 and layer.v.outliers.count > 0
    if "residual-many" in name:
        assert layer.k.residual.shape[1] >= 20
    if "residual-0" in name:
        assert layer.k.residual.shape[1] == 0


@pytest.mark.parametrize("name", ["int2-kchannel-vtoken-rotated", "int3-ktoken-vchannel-plain"])
def test_byte_per_code_reads_match_dense(model, name, monkeypatch):
    """The read that fetches every code at its own byte (head dims that are not a power of two; RoPE's
    partner channels) against dense, for the layouts the row read otherwise serves."""
    from streamkv.kv.attention import triton as backend

    monkeypatch.setattr(backend, "ROW_LOADS", False)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    compare(model, CASES[name], ids, steps=2)


def test_nothing_of_a_dropped_cache_survives_the_triton_reader(model):
    """What the Triton host derives (dense sinks, per-tile outlier lists) is held by the stored blocks
    and outlier stores it derives from, and goes with the cache."""
    import gc
    import weakref

    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    cache = compare(model, CASES["int8-prerope-plain-ktoken"], ids, steps=2)
    refs = [weakref.ref(t) for t in cache.tensors()]
    derived = [v for layer in cache.layers for s in (layer.k, layer.v) for b in (s.body, s.sinks) if b is not None
               for v in getattr(getattr(b, "inner", b), "derived", {}).values()]
    derived += [v[1] for layer in cache.layers for s in (layer.k,) if s.outliers is not None for v in s.outliers._memo.values()]
    refs += [weakref.ref(t) for v in derived for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]
    assert derived and len(refs) > 20
    del cache, derived
    gc.collect()
    assert not [r for r in refs if r() is not None]


def test_storage_without_a_kernel_is_read_by_fused(model, monkeypatch):
    """A block class the kernels do not read (a budgeted quantizer's blocks of several widths) sends the
    forward to ``fused``."""
    pytest.importorskip("hydra", reason="the lloyd_max quantizer is built through the registry here")
    from streamkv.kv.attention import fused

    calls = []
    attend = fused.FusedBackend.attend
    monkeypatch.setattr(fused.FusedBackend, "attend", lambda self, *a: calls.append(1) or attend(self, *a))
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    q = {"name": "lloyd_max", "key_group_size": 16, "value_group_size": 16, "budget_bits": 5.5, "widths": [2, 8]}
    compare(model, (q, "fixed", "none", 16, {}), ids, steps=2)
    assert calls


def _llama(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=kv_heads, max_position_embeddings=256, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval().to(DEVICE)


def test_batched_mqa_with_left_padding():
    """Batch 2 with one padded row (the mask reaches the kernel in decoding too), one KV head for four query heads."""
    model = _llama(kv_heads=1)
    ids = torch.randint(0, 128, (2, 44), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    compare(model, CASES["int4-prerope-rotated"], ids, steps=3, attention_mask=mask)


def test_batched_mha_unpadded():
    model = _llama(kv_heads=4)
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    compare(model, CASES["int3-ktoken-vchannel-plain"], ids, steps=2)


@pytest.mark.parametrize("family", ["mistral", "qwen3_5_text"])
def test_families_sliding_window_and_partial_rotary(family):
    """mistral: sliding-window layers (evicted groups, a body that starts past position 0, the window's
    mask by column); qwen3_5_text: linear-attention layers beside a full-attention layer whose pre-RoPE
    keys rotate only their leading quarter (partial rotary)."""
    from conftest import tiny_family_model

    model = copy.deepcopy(tiny_family_model(family)).to(DEVICE)
    ids = torch.randint(3, 128, (1, 56), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    q = {"name": "uniform", "key_group_size": 16, "value_group_size": 16, "rotate_keys": True, "rotate_values": True}
    compare(model, (q, "fixed", OUTLIERS, 16, dict(block_n=16)), ids, steps=6)
    if family == "qwen3_5_text":  # and without the rotation: RoPE's partner channels read from the codes
        compare(model, ({**q, "rotate_keys": False}, "fixed", OUTLIERS, 16, dict(block_n=16)), ids, steps=2)


def test_bfloat16_matches_dense_to_rounding(model):
    m16 = _llama(kv_heads=2).to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    scale = feed(m16, ids, build_compression(), 16, 0)[0].float().abs().max().item()
    compare(m16, CASES["int4-prerope-rotated"], ids, steps=2, dtype_atol=2 * 2.0 ** (math.floor(math.log2(scale)) - 7))


def test_perplexity_equals_dense_within_0_02_percent(tiny64):
    """The quality target on a tiny model (head_dim 64, the default 4-bit storage: rotated per-channel
    keys g128 before RoPE, per-token values g64, 4 sinks, outliers): streaming perplexity within ±0.02%."""
    model = copy.deepcopy(tiny64).to(DEVICE)
    ids = torch.randint(0, 128, (384,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    q = {"name": "uniform", "key_bits": 4, "value_bits": 4, "rotate_keys": True, "rotate_values": True}
    ppl = {}
    for attention in ("dense", TritonBackend()):
        logits, _ = shallow(feed, model, ids[None], build_compression(q, "fixed", "ema_relative", attention), 128, 0)
        nll = -torch.log_softmax(logits[0, :-1].double(), -1).gather(1, ids[1:, None]).mean().item()
        ppl[getattr(attention, "name", attention)] = math.exp(nll)
    assert abs(ppl["triton"] / ppl["dense"] - 1) < 2e-4, ppl


@pytest.mark.skipif(not ON_GPU, reason="host synchronisation is only observable on a CUDA device")
def test_no_host_synchronisation_in_attention(model, monkeypatch):
    attend = TritonBackend.attend

    def strict(self, *a, **kw):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return attend(self, *a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(TritonBackend, "attend", strict)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    compare(model, CASES["int4-prerope-rotated"], ids, steps=3)


@pytest.mark.skipif(not ON_GPU, reason="host synchronisation is only observable on a CUDA device")
def test_no_host_synchronisation_in_fused_decoding(model, monkeypatch):
    """The non-dense torch path (``fused``) on a GPU: a decoding forward never waits for the device."""
    attend = FusedBackend.attend

    def strict(self, view, query, *a, **kw):
        torch.cuda.set_sync_debug_mode("error" if query.shape[2] == 1 else "default")
        try:
            return attend(self, view, query, *a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(FusedBackend, "attend", strict)
    q, sink, outlier, chunk, _ = CASES["int4-prerope-rotated"]
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref, _ = feed(model, ids, build_compression(q, sink, outlier, "dense"), chunk, 3)
    got, _ = shallow(feed, model, ids, build_compression(q, sink, outlier, FusedBackend()), chunk, 3)
    torch.testing.assert_close(got.float(), ref.float(), atol=ATOL, rtol=0)


def test_kernel_benchmark_smoke(tmp_path):
    """``python -m runners.bench_attention --smoke``: tiny shapes, a table with the triton row timed."""
    from runners.bench_attention import main  # a plain function: no Hydra app to compose

    result = shallow(main, ["--smoke", "--backends", "sdpa,triton", "--out", str(tmp_path), "--device", str(DEVICE)])
    rows = {(r["batch"], r["backend"]): r for r in result["rows"]}
    assert rows[(2, "triton")]["ms"] > 0 and rows[(2, "triton")]["bytes"] < rows[(2, "sdpa")]["bytes"]
    assert "| 256 | 2 | triton |" in (tmp_path / "bench_attention.md").read_text()


BAD_BENCH = [
    (["--backends", "sdpa,foo"], "--backends 'sdpa,foo': choose from"),
    (["--backends", ","], "--backends ',': choose from"),
    (["--contexts", "0"], "--contexts '0': positive integers"),
    (["--contexts", "8k"], "argument --contexts: '8k' is not a comma-separated list of integers (see python -m"),
    (["--batches", "4,0"], "--batches '4,0': positive integers"),
    (["--warmup", "-1"], "--warmup -1: calls before timing, at least 0"),
    (["--repeats", "0"], "--repeats 0: timed calls, at least 1"),
    (["--device", "nope"], "--device 'nope' is not a torch device"),
]


@pytest.mark.parametrize("argv,needle", BAD_BENCH, ids=[a[0] + "=" + a[1] for a, _ in BAD_BENCH])
def test_kernel_benchmark_refuses_bad_options_before_running(argv, needle):
    from runners.bench_attention import main

    with pytest.raises(ConfigError) as e:
        main(argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_kernel_benchmark_bad_option_is_one_line():
    argv = [sys.executable, "-m", "runners.bench_attention", "--repeats", "0"]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert out.returncode == 2 and out.stderr.strip() == "error: --repeats 0: timed calls, at least 1", out.stderr


# -- composition ----------------------------------------------------------------------------------
def test_check_refuses_a_device_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not TritonBackend.importable()
    with pytest.raises(ConfigError, match=r"attention=triton runs on a CUDA GPU.*use attention=fused") as e:
        TritonBackend().check(build_compression("uniform"), torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_check_refuses_without_triton(monkeypatch):
    from streamkv.kv.attention import triton as backend

    monkeypatch.setattr(backend, "_triton_error", lambda: "ModuleNotFoundError: No module named 'triton'")
    assert not TritonBackend.importable()
    with pytest.raises(ConfigError, match=r"attention=triton needs the triton package .*use attention=fused"):
        TritonBackend().check(build_compression("uniform"), DEVICE)


def test_check_refuses_a_width_without_kernel():
    comp = build_compression("uniform")
    comp.quantizer.key_bits = 5  # past the quantizer's own validation: a width no kernel reads
    with pytest.raises(ConfigError, match=r"attention=triton reads packed widths \[1, 2, 3, 4, 8\], not quantizer.key_bits=5"):
        TritonBackend().check(comp, DEVICE)


def test_auto_picks_triton_on_cuda_and_fused_decoding_on_cpu():
    from streamkv.kv.attention import SplitBackend

    assert isinstance(AutoBackend().resolve(torch.device("cuda")), TritonBackend)  # importable here (interpreter or GPU)
    cpu = AutoBackend().resolve(torch.device("cpu"))
    assert isinstance(cpu, SplitBackend) and isinstance(cpu.decode, FusedBackend)
