"""The plugin inside a running vLLM engine (CPU, in-process, one subprocess per configuration).

Prompts are 600 tokens of the embedded text with a chunk budget of 256 tokens, so prefill runs in
three chunks and chunks two and three attend to history read back from packed pages; the 8 new tokens
take 7 decode steps, which attend straight from the packed slots (the fused decode). Stock and ``k8v8``
then run the prompt again beside a second request in the same engine (``MIXED``): an engine start is most
of a probe's time.
"""

import json

import pytest

pytest.importorskip("vllm.v1.attention.backends.cpu_attn")  # the vLLM venv only (tools/vllm_env.sh)

LAYERS, KV_HEADS, BLOCK, BF16_SLOT = 30, 3, 128, 256  # SmolLM2-135M, vLLM's CPU block size
BUDGET = 1 << 30  # VLLM_CPU_KVCACHE_SPACE=1 (GiB)
CHUNK = 256
DECODES = 7  # new_tokens=8: the first comes from the prefill
K4V4, K8V8 = 84, 140  # slot bytes per (token, KV head): codes + fp16 (scale, zero) per group
# Two processes of the same stock engine do not always compute alike: in CI runs (a fresh venv, the
# main suite beside it) some processes took a second set of bf16 numerics, never seen in repeated runs
# alone; it moved stock's own first-chunk logprobs by 0.039 on average (max 0.29, signed mean 0.0002),
# the size of bf16's floor (stock with chunks of 512 instead of 256: 0.041 on average, max 0.32). So
# every comparison across processes allows that floor; none asserts bit-equality.
FLOOR_MEAN, FLOOR_MAX = 0.05, 0.4
MIXED = {"second_prompt_tokens": 300}  # stock's and k8v8's probes also run the mixed steps (see the test)


def drift(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and max absolute difference of two logprob lists."""
    d = [abs(x - y) for x, y in zip(a, b)]
    return sum(d) / len(d), max(d)


def expected_blocks(slot_bytes: int) -> int:
    return BUDGET // (LAYERS * KV_HEADS * BLOCK * slot_bytes)


def test_plugin_engaged_pages_packed(probe):
    r = probe("k4v4")
    assert r["impls"] == ["StreamKVAttentionImpl"] and r["layers"] == LAYERS
    assert r["kv_dtypes"] == ["uint8"] * LAYERS
    assert all(shape == [r["blocks"], KV_HEADS, BLOCK, K4V4] for shape in r["kv_shapes"])
    assert r["calls"]["update"] > 0 and r["calls"]["forward"] > 0
    assert r["calls"]["compiled"] > 0  # the history was read by the numba kernel (the vLLM venv has numba)
    assert r["calls"]["fused_decode"] == LAYERS * DECODES  # every decode step, every layer: no bf16 history


def test_stock_engine_is_untouched_without_the_variable(probe):
    r = probe(None, **MIXED)
    assert r["impls"] == ["CPUAttentionBackendImpl"] and r["kv_dtypes"] == ["bfloat16"] * LAYERS
    assert r["calls"] is None


@pytest.mark.parametrize("preset,slot", [("k4v4", K4V4), ("k8v8", K8V8)])
def test_capacity_is_the_byte_ratio(probe, preset, slot):
    stock, packed = probe(None, **MIXED), probe(preset, **(MIXED if preset == "k8v8" else {}))
    assert stock["blocks"] == expected_blocks(BF16_SLOT)
    assert packed["blocks"] == expected_blocks(slot)  # vLLM sized its pool by the declared slot bytes
    assert packed["blocks"] / stock["blocks"] == pytest.approx(BF16_SLOT / slot, rel=2e-3)
    if preset == "k4v4":
        assert packed["blocks"] / stock["blocks"] >= 3.0


def test_k8v8_matches_stock(probe):
    stock, k8 = probe(None, **MIXED), probe("k8v8", **MIXED)
    assert k8["calls"]["fused_decode"] == LAYERS * DECODES  # the greedy steps below came from the fused decode
    # greedy: the same tokens until stock's first near-tie (its logits are bf16: ties are 1-2 ulps apart)
    ties = [i for i, m in enumerate(stock["greedy_margins"]) if m is not None and m < 0.3]
    firm = ties[0] if ties else len(stock["greedy"])
    assert firm >= 2 and k8["greedy"][:firm] == stock["greedy"][:firm]
    assert all(abs(a - b) < 0.1 for a, b in zip(stock["greedy_logprobs"][:firm], k8["greedy_logprobs"][:firm]))
    # k8v8 moved them by 0.024 on average (max 0.33) against a stock process of the same numerics
    mean, most = drift(stock["logprobs"], k8["logprobs"])
    assert mean < FLOOR_MEAN + 0.03 and most < FLOOR_MAX + 0.3
    diffs = [b - a for a, b in zip(stock["logprobs"], k8["logprobs"])]
    assert abs(sum(diffs) / len(diffs)) < 0.01  # mean log-likelihood: perplexity within 1%


def test_chunked_prefill_reads_compressed_pages(probe):
    stock, k4 = probe(None, **MIXED), probe("k4v4")
    first = CHUNK - 1  # logprobs of tokens 1..255 come from the first chunk, which has no history
    # its own tokens at full precision, through stock's kernel: equal bit for bit where both processes
    # compute alike (the development machine), within bf16's floor where they do not (see FLOOR_MEAN)
    mean, most = drift(stock["logprobs"][:first], k4["logprobs"][:first])
    assert mean < FLOOR_MEAN and most < FLOOR_MAX
    later, _ = drift(stock["logprobs"][first:], k4["logprobs"][first:])
    assert later > 0  # chunks 2 and 3 saw 4-bit history ...
    assert later < 0.075 + FLOOR_MEAN  # ... close to the full-precision one (0.075 against equal numerics)
    # history entries dequantized from pages: chunk 2 reads 256, chunk 3 reads 512, in every layer
    assert k4["calls"]["read"] >= LAYERS * (CHUNK + 2 * CHUNK)


def test_mixed_steps_split_decodes_from_prefill(probe):
    """The prompt again beside a second request (300 tokens): the second's prefill overlaps the first's
    decoding, so steps mix a decode (fused) with a prefill chunk (read path, its own sub-metadata); both
    requests stay with stock at k8v8."""
    stock, k8 = probe(None, **MIXED)["mixed"], probe("k8v8", **MIXED)["mixed"]
    assert k8["calls"]["mixed"] > 0 and k8["calls"]["fused_decode"] > k8["calls"]["mixed"]
    for s, k in ((stock["first"], k8["first"]), (stock["second"], k8["second"])):
        ties = [i for i, m in enumerate(s["greedy_margins"]) if m is not None and m < 0.3]
        firm = ties[0] if ties else len(s["greedy"])
        assert firm >= 2 and k["greedy"][:firm] == s["greedy"][:firm]
        # bf16 noise: batching one request with another moves stock's own greedy logprobs by up to 0.07;
        # k8v8 moved them by up to 0.14 here (0.08 with decodes through the read path) when this was written
        steps = [abs(a - b) for a, b in zip(s["greedy_logprobs"][:firm], k["greedy_logprobs"][:firm])]
        assert max(steps) < 0.2 and sum(steps) / len(steps) < 0.1
        assert drift(s["logprobs"], k["logprobs"])[0] < 0.03 + FLOOR_MEAN


def test_edge_layers_keep_dense_pages_in_the_same_pool(probe):
    """STREAMKV_VLLM_EDGE_LAYERS=2: layers 0, 1, 28, 29 hold bf16 pages, the rest packed, one block pool."""
    r = probe("k4v4", edge_layers=2)
    edge = [0, 1, LAYERS - 2, LAYERS - 1]
    assert [i for i, d in enumerate(r["kv_dtypes"]) if d == "bfloat16"] == edge
    assert all(d == "uint8" for i, d in enumerate(r["kv_dtypes"]) if i not in edge)
    per_block = BLOCK * KV_HEADS * (len(edge) * BF16_SLOT + (LAYERS - len(edge)) * K4V4)
    assert r["blocks"] == BUDGET // per_block  # pages per layer, no padding
    stock = probe(None, **MIXED)
    # the first chunk reads no packed page: stock's computation, within bf16's floor (see FLOOR_MEAN)
    mean, most = drift(stock["logprobs"][: CHUNK - 1], r["logprobs"][: CHUNK - 1])
    assert mean < FLOOR_MEAN and most < FLOOR_MAX
    assert r["calls"]["read"] >= (LAYERS - len(edge)) * 3 * CHUNK  # only packed layers dequantize


def test_bad_preset_fails_in_one_line_before_the_engine(embedded_model, raw_probe):
    rc, report, err = raw_probe({"model": str(embedded_model)}, "k5v5")
    assert rc != 0 and report is None
    last = err.strip().splitlines()[-1]
    assert "STREAMKV_VLLM='k5v5' is not allowed" in last and "k8v8" in last
    assert "Loading weights" not in err


def test_sinks_are_refused_in_one_line_before_the_engine(embedded_model, raw_probe):
    rc, report, err = raw_probe({"model": str(embedded_model)}, "k4v4,sink.size=4")
    assert rc != 0 and report is None
    last = err.strip().splitlines()[-1]
    assert "sink.size=4 is not supported" in last and "attention sinks" in last
    assert "Loading weights" not in err


def test_unsupported_head_size_fails_before_weights(embedded_model, raw_probe, tmp_path):
    """A model dir with head_dim 80 and no weights at all: the error must come before vLLM looks for them."""
    config = json.loads((embedded_model / "config.json").read_text())
    config.update(head_dim=80, num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((embedded_model / name).read_bytes())
    rc, report, err = raw_probe({"model": str(tmp_path)}, "k4v4")
    assert rc != 0 and report is None
    assert "head_size=80" in err.strip().splitlines()[-1]
    assert "model weights" not in err
