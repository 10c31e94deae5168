"""The plugin without an engine: presets, slot codec, entry point behaviour."""

import pytest

pytest.importorskip("vllm.v1.attention.backends.cpu_attn")  # the vLLM venv only (tools/vllm_env.sh)

import torch

from streamkv.integrations.vllm import presets
from streamkv.integrations.vllm.codec import SlotCodec, by_token, layout


@pytest.mark.parametrize("name,k,v", [("k8v8", 8, 8), ("k4v4", 4, 4), ("k8v4", 8, 4), ("k4v2", 4, 2), ("K2V2", 2, 2)])
def test_presets_parse(name, k, v):
    p = presets.parse(name)
    assert (p.key_bits, p.value_bits, p.edge_layers) == (k, v, 0)


@pytest.mark.parametrize("bad", ["k5v5", "int4", "k4", "", "k16v16"])
def test_bad_preset_is_one_line_naming_value_and_choices(bad):
    with pytest.raises(ValueError) as e:
        presets.parse(bad)
    msg = str(e.value)
    assert "\n" not in msg and repr(bad) in msg and "k8v8" in msg and "k2v2" in msg


@pytest.mark.parametrize("option,why", [
    ("sink.size=4", "attention sinks"), ("sink=fixed", "attention sinks"), ("outlier=ema_relative", "sparse outliers"),
    ("quantizer.key_axis=channel", "per-channel key groups"), ("quantizer.pre_rope=true", "RoPE"),
])
def test_engine_settings_the_slot_cannot_hold_are_refused_in_one_line(option, why):
    with pytest.raises(ValueError) as e:
        presets.parse(f"k4v4,{option}")
    msg = str(e.value)
    assert "\n" not in msg and option in msg and why in msg and "not supported" in msg


def test_engine_settings_the_slot_already_has_are_accepted():
    p = presets.parse("k4v4, sink.size=0, outlier=none, quantizer.key_axis=token, quantizer.pre_rope=false")
    assert (p.key_bits, p.value_bits) == (4, 4)
    with pytest.raises(ValueError, match="option 'quantizer.group=7' is not allowed"):
        presets.parse("k4v4,quantizer.group=7")


def test_bad_edge_layers():
    with pytest.raises(ValueError, match="STREAMKV_VLLM_EDGE_LAYERS='two'"):
        presets.parse("k4v4", "two")


@pytest.mark.parametrize("k,v,slot", [(8, 8, 140), (4, 4, 84), (8, 4, 108), (4, 2, 68), (2, 2, 52), (3, 3, 68)])
def test_slot_bytes_and_round_trip(k, v, slot):
    codec = layout(64, k, v)
    # codes + an fp16 (scale, zero) per group: keys in groups of 16 (32 at 8 bits), values in one of 64
    assert codec.slot_bytes == slot
    torch.manual_seed(0)
    key, value = torch.randn(50, 3, 64, dtype=torch.bfloat16), torch.randn(50, 3, 64, dtype=torch.bfloat16)
    slots = codec.encode(key, value)
    assert slots.dtype == torch.uint8 and slots.shape == (50, 3, slot)
    k2, v2 = codec.decode(slots)
    for x, y, bits in ((key, k2, k), (value, v2, v)):
        rel = ((x.float() - y).norm() / x.float().norm()).item()
        assert rel < {2: 0.5, 3: 0.25, 4: 0.1, 8: 0.006}[bits]


@pytest.mark.parametrize("k,v,isa", [(4, 4, "amx"), (4, 4, "vec"), (3, 3, "amx"), (8, 2, "amx")])  # one compile each
def test_compiled_read_matches_the_torch_read_in_vllms_page_layout(k, v, isa):
    """The numba read writes, straight into vLLM's page layout, exactly what the torch ops + vLLM's own
    store write (rotated keys and values of whole pages, in the order the pages are asked for)."""
    pytest.importorskip("numba")
    from vllm import _custom_ops as ops

    from streamkv.integrations.vllm.kernel import read_pages

    if isa == "amx" and not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX on this CPU")
    codec, pages_n, heads, block = layout(64, k, v), 5, 3, 128
    torch.manual_seed(0)
    pool = torch.zeros(pages_n + 2, 2, heads, block, codec.slot_bytes, dtype=torch.uint8)[:, 1]  # strided, as vLLM's
    x = torch.randn(2, pages_n * block, heads, 64) * 3
    by_token(pool)[:pages_n] = codec.encode(x[0], x[1]).view(pages_n, block, heads, -1, 4).transpose(1, 2)
    pages = torch.tensor([3, 0, 4])
    fast = torch.empty(len(pages), heads, block, 128, dtype=torch.bfloat16)
    assert read_pages(codec, pool, pages, fast, isa)
    rows = torch.empty(2, len(pages) * block, heads, 64, dtype=torch.bfloat16)
    packed = by_token(pool)[pages].transpose(1, 2).reshape(len(pages) * block, heads, -1)
    codec.dequantize_into(packed, rows[0], rows[1])
    ref = torch.zeros_like(fast)
    kc, vc = ref.view(len(pages), heads, 2 * block, 64).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(rows[0], rows[1], kc, vc, torch.arange(len(pages) * block), isa, k_scale=1.0,
                                   v_scale=1.0, kv_cache_dtype="auto")
    assert torch.equal(fast, ref)
    kr, _ = codec.decode(by_token(pool)[pages].transpose(1, 2).flatten(-2))  # and they are the stored tokens, rotated
    assert torch.allclose(codec.rotate(kr), rows[0].view(len(pages), block, heads, 64).float(), atol=0.06)


def test_importing_the_backend_loads_no_numba():
    """vLLM 0.32's CPU worker dies at start if numba is loaded: the plugin loads it on its first read only."""
    import subprocess
    import sys

    code = "import sys, streamkv.integrations.vllm.backend; assert 'numba' not in sys.modules, 'numba loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_slot_is_per_token():
    """A token's slot depends on that token only: slots can be written chunk by chunk."""
    codec = layout(64, 4, 4)
    key, value = torch.randn(20, 3, 64), torch.randn(20, 3, 64)
    assert torch.equal(codec.encode(key, value)[5:9], codec.encode(key[5:9], value[5:9]))


@pytest.mark.parametrize("head_size", [48, 80, 96, 24])
def test_unsupported_head_size(head_size):
    with pytest.raises(ValueError, match=f"head_size={head_size}"):
        layout(head_size, 4, 4)


def test_bits_outside_the_packable_widths():
    with pytest.raises(ValueError, match="key_bits=5"):
        SlotCodec(64, 5, 4)


def test_slots_are_whole_words_in_word_major_pages():
    """A page holds word ``w`` of token ``t`` at word ``w * block + t``; a slot that is not whole words
    is refused."""
    with pytest.raises(ValueError, match="head_size=16 packs its keys into 10 bytes"):
        SlotCodec(16, 3, 4, 16, 16)
    codec, block = layout(64, 4, 4), 8
    pool = torch.zeros(2, 3, block, codec.slot_bytes, dtype=torch.uint8)
    slots = codec.encode(torch.randn(block, 3, 64), torch.randn(block, 3, 64))
    by_token(pool)[1] = slots.view(block, 3, -1, 4).transpose(0, 1)
    words = pool[1, 2].view(-1, 4)  # (words * block, 4) in page order
    assert torch.equal(words.view(-1, block, 4).transpose(0, 1).flatten(1), slots[:, 2])


def test_register_is_a_no_op_without_the_variable(monkeypatch):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import streamkv.integrations.vllm as plugin

    monkeypatch.delenv("STREAMKV_VLLM", raising=False)
    before = AttentionBackendEnum.CPU_ATTN.get_path()
    plugin.register()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == before
    assert "streamkv" not in before


def _history(codec, pool, table, past):
    """Keys and values ``(past, heads, head_dim)`` (float32, un-rotated) a sequence stored in its pages."""
    t = torch.arange(int(past))
    return codec.decode(by_token(pool)[table[t // pool.shape[2]].long(), :, t % pool.shape[2]].flatten(-2))


def _attention(q, k, v, scale):
    """float64 causal-free attention of ``q`` (heads, d) over ``k``/``v`` (tokens, kv_heads, d), GQA."""
    q, k, v = q.double(), k.double(), v.double()
    per = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(per, 1), v.repeat_interleave(per, 1)  # (tokens, heads, d)
    p = torch.softmax(torch.einsum("hd,thd->ht", q, k) * scale, -1)
    return torch.einsum("ht,thd->hd", p, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,v", [(4, 4), (8, 4), (2, 2), (3, 3), (8, 8), (4, 2)])
def test_fused_decode_matches_float64_attention_over_the_decoded_slots(k, v, dtype):
    """The fused decode (scores from the key codes, values from the value codes, online softmax) is
    attention over ``codec.decode`` of the stored slots plus the own token at full precision, written at
    its sequences' rows of the step (and nowhere else), in the step's dtype."""
    pytest.importorskip("numba")
    from streamkv.integrations.vllm.kernel import decode

    codec, kv_heads, per, block, d, scale = layout(64, k, v), 3, 3, 128, 64, 0.125
    torch.manual_seed(0)
    pool = torch.zeros(9, 2, kv_heads, block, codec.slot_bytes, dtype=torch.uint8)[:, 1]  # strided, as vLLM's
    x = torch.randn(2, 9 * block, kv_heads, d) * 3 + torch.randn(2, 1, kv_heads, d)
    by_token(pool)[:] = codec.encode(x[0], x[1]).view(9, block, kv_heads, -1, 4).transpose(1, 2)
    past = torch.tensor([300, 1, 0, 129, 256, 128])  # pages: partial last, one token, none, just over, exact
    table = torch.tensor([[7, 2, 5, 0], [4, 0, 0, 0], [0, 0, 0, 0], [1, 8, 0, 0], [3, 6, 0, 0], [2, 0, 0, 0]],
                         dtype=torch.int32)
    rows = torch.tensor([1, 3, 4, 6, 8, 9])  # the decodes' rows among 10 (the others: prefill chunks)
    qkv = (torch.randn(10, (kv_heads * per + 2 * kv_heads) * d) * 2).to(dtype)  # vLLM's split views
    q = qkv[:, :kv_heads * per * d]
    k_own, v_own = (qkv[:, (kv_heads * per + i * kv_heads) * d:][:, :kv_heads * d].view(10, kv_heads, d) for i in (0, 1))
    out = torch.full((10, kv_heads * per * d), 7.0, dtype=dtype)
    assert decode(codec, pool, table, past, rows, q, k_own, v_own, out, scale)
    out = out.view(10, kv_heads * per, d).float()
    for s, r in enumerate(rows):
        hk, hv = _history(codec, pool, table[s], past[s])
        ref = _attention(q[r].view(-1, d).float(), torch.cat([hk, k_own[r, None].float()]),
                         torch.cat([hv, v_own[r, None].float()]), scale)
        tol = 1e-4 if dtype == torch.float32 else 8e-3  # bf16: the output's rounding
        assert (out[r] - ref).abs().max() <= tol * ref.abs().max(), s
    assert torch.allclose(out[4], v_own[4].float().repeat_interleave(per, 0), rtol=tol)  # no history: its own value
    assert bool((out[[0, 2, 5, 7]] == 7).all())  # other rows untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,v", [(4, 4), (8, 4), (2, 2), (3, 3), (8, 8), (4, 2)])
def test_the_compiled_store_writes_the_codecs_slots(k, v, dtype):
    """``kernel.store`` (rotate, quantize, pack, scatter in one pass) writes what ``SlotCodec.encode`` and
    an indexed store write, at the given slots of a strided page set, and nothing elsewhere."""
    pytest.importorskip("numba")
    from streamkv.integrations.vllm.kernel import store

    codec = layout(64, k, v)
    torch.manual_seed(0)
    key = (torch.randn(300, 3, 64) * 3 + torch.randn(1, 3, 64)).to(dtype)
    value = torch.randn(300, 3, 64).to(dtype)
    pool = torch.zeros(5, 2, 3, 128, codec.slot_bytes, dtype=torch.uint8)[:, 1]  # strided, as vLLM's
    slots = torch.randperm(5 * 128)[:300]
    assert store(codec, key, value, pool, slots)
    got, ref = by_token(pool)[slots // 128, :, slots % 128].flatten(-2), codec.encode(key, value)
    assert (got == ref).float().mean() > 0.999  # the same arithmetic; only the rotation's summation order differs
    (kg, vg), (kr, vr) = codec.decode(got), codec.decode(ref)
    assert (kg - kr).abs().max() <= 0.5 and (vg - vr).abs().max() <= 0.5  # and then by at most a step or so
    rest = torch.ones(5 * 128, dtype=torch.bool)
    rest[slots] = False
    assert not bool(by_token(pool).transpose(1, 2).reshape(-1, 3, codec.slot_bytes)[rest].any())  # nothing elsewhere


def test_a_mixed_step_splits_decodes_from_prefill_chunks(monkeypatch):
    """A step whose rows interleave decodes and prefill chunks (vLLM's CPU builder does not reorder):
    the decodes take the fused path, the chunks the read path on their own sub-metadata, and every row
    is attention over its decoded history and its own tokens at full precision (up to bf16)."""
    pytest.importorskip("numba")
    from dataclasses import replace
    from types import SimpleNamespace

    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends import cpu_attn

    from streamkv.integrations.vllm import backend

    monkeypatch.setenv("STREAMKV_VLLM", "k4v4")
    backend._preset.cache_clear()
    model = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16))
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: model)
    heads, kv_heads, d, block, scale = 9, 3, 64, 128, 0.125
    impl = backend.StreamKVAttentionImpl(heads, d, scale, kv_heads, None, None, "auto")
    layer = SimpleNamespace(isa=cpu_attn._get_attn_isa(torch.bfloat16, block, d), _k_scale_float=1.0,
                            _v_scale_float=1.0)
    past, q_lens = torch.tensor([300, 130, 5, 0, 200]), torch.tensor([1, 40, 1, 20, 1])
    seq_lens = past + q_lens
    torch.manual_seed(0)
    ids = torch.randperm(12)[:9].split(((seq_lens + block - 1) // block).tolist())  # non-contiguous page ids
    table = torch.zeros(len(past), 4, dtype=torch.int32)
    for s, p in enumerate(ids):
        table[s, : len(p)] = p
    kv_cache = torch.zeros(12, 2, kv_heads, block, impl.codec.slot_bytes, dtype=torch.uint8)[:, 0]
    kv = [torch.randn(2, int(n), kv_heads, d).bfloat16() for n in seq_lens]
    slots = [table[s, t // block].long() * block + t % block for s, t in enumerate(map(torch.arange, seq_lens))]
    for x, slot in zip(kv, slots):  # every token stored, as vLLM does before forward
        impl.do_kv_cache_update(layer, x[0], x[1], kv_cache, slot)
    key = torch.cat([x[0, p:] for x, p in zip(kv, past.tolist())])
    value = torch.cat([x[1, p:] for x, p in zip(kv, past.tolist())])
    query = torch.randn(len(key), heads, d).bfloat16()
    starts = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(q_lens, 0).int()])
    md = cpu_attn.CPUAttentionMetadata(
        num_actual_tokens=len(key), max_query_len=int(q_lens.max()), query_start_loc=starts,
        max_seq_len=int(seq_lens.max()), seq_lens=seq_lens.int(), block_table=table,
        slot_mapping=torch.cat([x[p:] for x, p in zip(slots, past.tolist())]),
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(past), num_heads=heads, num_kv_heads=kv_heads, head_dim=d, seq_lens=seq_lens.int(),
            dtype=torch.bfloat16, query_start_loc=starts, causal=True, sliding_window_size=-1, isa=layer.isa,
            enable_kv_split=False))
    before = dict(impl.calls)
    output = impl.forward(layer, query, key, value, kv_cache, md, torch.empty_like(query))
    assert impl.calls["fused_decode"] == before["fused_decode"] + 1 and impl.calls["mixed"] == before["mixed"] + 1
    assert impl.calls["read"] - before["read"] == int(past.sum())
    for s in range(len(past)):
        hk, hv = _history(impl.codec, kv_cache, table[s], past[s])
        for i in range(int(q_lens[s])):
            r = int(starts[s]) + i
            own = slice(int(starts[s]), r + 1)
            ref = _attention(query[r].float(), torch.cat([hk, key[own].float()]), torch.cat([hv, value[own].float()]),
                             scale)
            tol = 0.01 if q_lens[s] == 1 else 0.03  # decodes: the output's bf16 rounding; chunks: bf16 history too
            assert (output[r] - ref).abs().max() <= tol * ref.abs().max(), (s, i)
    monkeypatch.setattr(backend, "decode", lambda *a: None)  # without numba's decode: one read path for all
    whole = impl.forward(layer, query, key, value, kv_cache, replace(md), torch.empty_like(query))
    chunks = torch.cat([torch.arange(int(starts[s]), int(starts[s + 1])) for s in (1, 3)])
    assert torch.equal(whole[chunks], output[chunks])  # the chunks' sub-metadata: the same as in the whole step
