"""Lloyd-Max codebooks, the lloyd_max quantizer and its online bit allocation under a budget."""

from __future__ import annotations

import pytest
import torch

from streamkv import CompressedCache, ConfigError
from streamkv.kv.storage.codebook import decode_scale, encode_scale, quantize_lloyd_max
from streamkv.kv.storage.composite import RowSplit, Segments
from streamkv.kv.storage.levels import LLOYD_MAX_BITS, gaussian_mse, lloyd_max
from streamkv.kv.storage.packed import quantize
from streamkv.kv.storage.rotated import Rotated
from streamkv.lab.compression import build_compression
from streamkv.lab.streaming import compare_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bits", LLOYD_MAX_BITS)
def test_codebooks_are_sorted_and_symmetric(bits):
    c = lloyd_max(bits)
    assert c.dtype == torch.float32 and c.numel() == 2**bits
    assert bool((c[1:] > c[:-1]).all())
    assert torch.equal(c, -c.flip(0))


def test_codebooks_are_the_known_lloyd_max_quantizers_of_a_gaussian():
    # Max (1960) / Lloyd (1982): MSE 0.3634, 0.1175, 0.03455, 0.009497; 2-bit levels +-0.4528, +-1.510
    assert [round(gaussian_mse(b), 4) for b in (1, 2, 3, 4)] == [0.3634, 0.1175, 0.0345, 0.0095]
    torch.testing.assert_close(lloyd_max(2), torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104]), atol=1e-4, rtol=0)
    assert gaussian_mse(3) < gaussian_mse(3, 1.05) and gaussian_mse(3) < gaussian_mse(3, 0.95)  # a minimum


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("axis,group", [("token", 64), ("channel", 128)])
def test_codebook_error_on_gaussian_data_is_below_min_max_at_equal_bits(bits, axis, group):
    x = torch.randn(6, 256, 64, generator=torch.Generator().manual_seed(bits))
    minmax = quantize(x, bits, axis, group).dequantize(torch.float32)
    err_mm = (minmax - x).square().mean()
    for scale in ("rms", "mse"):
        for rec in ("centroid", "projection"):
            q = quantize_lloyd_max(x, bits, axis, group, scale, "fp16", False, rotated=False, reconstruction=rec)
            err = (q.dequantize(torch.float32) - x).square().mean()
            if scale == "mse" or bits < 4:  # at 4 bits a 64-value min-max group (2 fp16s) edges the plain RMS scale
                assert err < err_mm, (scale, rec)
            assert q.nbytes < quantize(x, bits, axis, group).nbytes  # one scale per group, no zero


def test_projection_reconstruction_keeps_inner_products_unbiased():
    x = torch.randn(4, 128, 64, generator=torch.Generator().manual_seed(1))
    for rec, lo, hi in (("centroid", 0.85, 0.93), ("projection", 0.99, 1.01)):
        y = quantize_lloyd_max(x, 2, "token", 64, "rms", "fp16", False, False, reconstruction=rec).dequantize(torch.float32)
        slope = float((x * y).sum() / (x * x).sum())
        assert lo < slope < hi, (rec, slope)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("reconstruction", ["centroid", "unbiased", "projection"])
def test_compiled_mse_search_stores_what_the_torch_reference_stores(bits, reconstruction, monkeypatch):
    """scale=mse on the CPU: the compiled search (scale_search.py) against its torch reference, groups
    of very different sizes, sink tokens and a sparse outlier left out of the statistics."""
    pytest.importorskip("numba")
    from streamkv.kv.storage import scale_search

    torch.manual_seed(bits)
    x = torch.randn(3, 200, 64) * torch.rand(3, 200, 1) * 4
    exclude = torch.zeros_like(x, dtype=torch.bool)
    exclude[:, :4] = True
    exclude[1, 50, 7] = True
    for leave_out in (None, exclude):
        compiled = quantize_lloyd_max(x, bits, "token", 32, "mse", "log8", False, True, leave_out, reconstruction)
        monkeypatch.setattr(scale_search, "available", lambda: False)
        reference = quantize_lloyd_max(x, bits, "token", 32, "mse", "log8", False, True, leave_out, reconstruction)
        monkeypatch.undo()
        assert torch.equal(compiled.inner.scale, reference.inner.scale)
        assert torch.equal(compiled.inner.codes, reference.inner.codes)


def test_log8_scales_take_one_byte_and_round_to_within_five_percent():
    s = torch.tensor([1e-4, 0.013, 1.0, 7.5, 1000.0])
    code = encode_scale(s, "log8")
    assert code.dtype == torch.uint8 and code.nbytes == 5
    assert ((decode_scale(code) / s - 1).abs() < 0.045).all()


def test_rotated_groups_read_back_close_and_sinks_do_not_set_the_scale():
    x = torch.randn(2, 128, 64, generator=torch.Generator().manual_seed(2))
    x[:, :4] *= 50  # sink tokens, stored elsewhere
    exclude = torch.zeros_like(x, dtype=torch.bool)
    exclude[:, :4] = True
    q = quantize_lloyd_max(x, 4, "channel", 128, "mse", "log8", True, True, exclude, "projection")
    err = (q.dequantize(torch.float32) - x)[:, 4:].square().mean() / x[:, 4:].square().mean()
    assert err < 0.02


def test_segments_of_different_widths_read_back_in_order():
    x = torch.randn(3, 96, 64, generator=torch.Generator().manual_seed(3))
    parts = [quantize_lloyd_max(x[:, i * 32 : (i + 1) * 32], b, "token", 64, rotated=False) for i, b in enumerate((4, 2, 4))]
    s = parts[0].append(parts[1]).append(parts[2])
    assert isinstance(s, Segments) and len(s.parts) == 3 and s.tokens == 96
    want = torch.cat([p.dequantize(torch.float32) for p in parts], 1)
    out = torch.empty(3, 100, 64)
    s.dequantize(torch.float32, out=out[:, :96])
    assert torch.equal(out[:, :96], want) and torch.equal(s.dequantize(torch.float32), want)
    assert s.nbytes == sum(p.nbytes for p in parts)
    same = parts[0].append(quantize_lloyd_max(x[:, :32], 4, "token", 64, rotated=False))  # equal layouts concatenate
    assert not isinstance(same, Segments) and same.tokens == 64


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"key_bits": 5}, "quantizer.key_bits=5 has no Lloyd-Max codebook; widths with one: [1, 2, 3, 4, 8]"),
        ({"value_bits": 6}, "quantizer.value_bits=6 has no Lloyd-Max codebook"),
        ({"widths": [2, 6]}, "quantizer.widths=6 has no Lloyd-Max codebook"),
        ({"budget_bits": 1.5}, "quantizer.budget_bits=1.5 cannot be realised with quantizer.widths=[2, 3, 4, 8]"),
        ({"budget_bits": 12.0}, "quantizer.budget_bits=12.0 cannot be realised"),
        ({"scale": "max"}, "quantizer.scale='max' is not allowed"),
    ],
)
def test_bad_widths_and_budgets_are_one_line_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace("]", r"\]")) as e:
        build_compression({"name": "lloyd_max", **kwargs}, "none", "none")
    assert "\n" not in str(e.value)


def test_a_budget_below_what_the_format_can_store_is_refused_once_the_head_is_known(tiny64):
    comp = build_compression({"name": "lloyd_max", "budget_bits": 2.1, "key_group_size": 32}, "none", "none")
    with pytest.raises(ConfigError, match=r"budget_bits=2.1 cannot be realised .* allowed 2\.562 to 8\.562"):
        CompressedCache.for_model(tiny64, comp, chunk_size=64)


def _run(model, quantizer, n=512, chunk=64):
    cache = CompressedCache.for_model(model, build_compression(quantizer, "fixed", "ema_relative"), chunk_size=chunk)
    ids = torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(0))
    ref = CompressedCache.for_model(model, build_compression(), chunk_size=chunk)
    res = compare_logprobs(model, ids, cache, ref, chunk)
    return cache, res


@pytest.mark.parametrize("budget", [3.0, 3.5, 4.25])
def test_budgeted_run_realises_its_average_bits(tiny64, budget):
    q = {"name": "lloyd_max", "budget_bits": budget, "key_group_size": 32}
    cache, _ = _run(tiny64, q)
    stats = cache.stats()
    assert stats["avg_bits"] == pytest.approx(budget, abs=0.05)
    assert stats["kv_bytes"] == sum(t.nbytes for t in cache.tensors())  # everything held is counted
    assert cache.compression.quantizer.rounds == 512 // 64


def test_budget_chooses_widths_per_layer_and_kind_and_keys_get_more(tiny64):
    cache, _ = _run(tiny64, {"name": "lloyd_max", "budget_bits": 3.5, "key_group_size": 32, "kind_weight": 4.0, "granularity": "layer"})
    table = cache.compression.quantizer.table
    assert table[("key", 0, -1)] >= table[("value", 0, -1)] and table[("key", 1, -1)] >= table[("value", 1, -1)]
    assert len({table[(k, layer, -1)] for k in ("key", "value") for layer in (0, 1)}) > 1


def test_per_head_widths_read_back_and_count(tiny_llama):
    """Two kv heads at different widths in one block: stored apart, read back in place, widths counted."""
    q = {"name": "lloyd_max", "budget_bits": 4.75, "key_group_size": 16, "granularity": "head"}
    cache, res = _run(tiny_llama, q, n=256, chunk=32)
    stats = cache.stats()
    assert stats["avg_bits"] == pytest.approx(4.75, abs=0.05) and stats["kv_bytes"] == sum(t.nbytes for t in cache.tensors())
    table = cache.compression.quantizer.table
    assert {u[2] for u in table} == {0, 1}
    bodies = [s.body.inner if isinstance(s.body, Rotated) else s.body for layer in cache.layers for s in (layer.k, layer.v)]
    assert any(isinstance(p, RowSplit) for b in bodies for p in getattr(b, "parts", [b]))
    ref, _ = _run(tiny_llama, {"name": "lloyd_max", "key_bits": 8, "value_bits": 8, "key_group_size": 16}, n=256, chunk=32)
    assert res["kl"].mean() < 0.01


def test_kl_grows_as_the_budget_shrinks(tiny64):
    kl = [_run(tiny64, {"name": "lloyd_max", "budget_bits": b, "key_group_size": 32})[1]["kl"].mean().item() for b in (6.0, 4.0, 3.0)]
    assert kl[0] < kl[1] < kl[2]
