"""A vLLM CPU attention backend whose KV pages hold streamkv's packed slots instead of bf16 keys/values.

It is vLLM's ``CPU_ATTN`` backend with three changes:

* ``customize_spec`` declares a uint8 page of ``slot_bytes`` per (token, KV head), so vLLM sizes its
  pages and its KV budget by the packed bytes (that is where the capacity gain comes from);
* ``do_kv_cache_update`` quantizes every token it is given (each prefill chunk, each decoded token)
  into its slot (one compiled pass, ``kernel.store``), so nothing in the cache is kept at full precision;
* ``forward`` reads the packed history two ways, by sequence (``plan.py`` splits the step):

  - a sequence whose query is one token (a decode) attends straight from its packed slots in one
    compiled pass (``kernel.decode``): scores from the key codes, values accumulated from the value
    codes, float32 throughout, its own key and value last at full precision. Why: the read path below
    writes the whole history out as bf16 in every layer of every decode step, for one query token;
  - the others (prefill chunks) dequantize their pages (and no others) into a transient bf16 page
    set, still in the Hadamard-rotated domain, with their own keys/values there at full precision
    (streamkv's chunked-prefill rule: a chunk attends to its compressed past and to itself exactly),
    and run vLLM's own CPU attention kernel on it (``kernel.read_pages`` writes straight into vLLM's
    ISA-specific page layout). A step mixing both runs the two on their own rows.

  Both rotate their queries and un-rotate their output once, so the only difference from stock is the
  stored history's quantization error (and, for decodes, float32 where stock rounds to bf16).

Prefill sequences with no history (first chunks) take the stock numerics exactly: no rotation at all.
What each step reads is worked out once (the step's metadata object is shared by all layers) in
:class:`~.plan.StepPlan`. Without numba, every sequence takes the read path through torch ops. Pages
whose dtype is not uint8 (full-precision edge layers, see ``edge.py``) go to the stock paths.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from typing import ClassVar

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.kv_cache_interface import AttentionSpec, KVQuantMode

from .codec import WORD, ConfigError, SlotCodec, by_token, layout
from .kernel import decode, read_pages, store
from .plan import Dense, StepPlan
from .presets import ENV, Preset, from_env


@cache
def _preset() -> Preset:
    preset = from_env()
    if preset is None:
        raise ConfigError(f"streamkv's vLLM backend is registered but {ENV} is unset")
    return preset


def codec_for(head_size: int) -> SlotCodec:
    p = _preset()
    return layout(head_size, p.key_bits, p.value_bits)


class StreamKVAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with packed streamkv pages; see the module docstring."""

    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # vLLM keys CPU-specific paths (block sizes, layouts) on this name

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == "decoder"

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        if spec.state_content_bytes is not None:
            return spec
        if spec.kv_quant_mode != KVQuantMode.NONE:
            raise ConfigError(f"{ENV} needs kv_cache_dtype='auto'; got a quantized cache ({spec.kv_quant_mode.name})")
        return replace(spec, dtype=torch.uint8, state_content_bytes=codec_for(spec.head_size).slot_bytes)

    @staticmethod
    def get_impl_cls() -> type[StreamKVAttentionImpl]:
        return StreamKVAttentionImpl


class StreamKVAttentionImpl(CPUAttentionBackendImpl):
    """Writes and reads packed slots; see the module docstring."""

    # how often the packed paths ran (per layer), how many (token, layer) entries were read back from packed
    # slots, how many dense reads the compiled kernel did, how many forwards took the fused decode and how
    # many of those also had prefill sequences (a mixed step, split)
    calls: ClassVar[dict[str, int]] = {"update": 0, "forward": 0, "read": 0, "compiled": 0, "fused_decode": 0,
                                       "mixed": 0}

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap=None, attn_type="decoder", kv_sharing_target_layer_name=None,
                 sinks=None) -> None:
        unsupported = {
            "alibi slopes": alibi_slopes is not None,
            "a sliding window": sliding_window is not None,
            "a logits soft cap": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            f"attention type {attn_type!r}": attn_type != "decoder",
            f"kv_cache_dtype={kv_cache_dtype!r}": kv_cache_dtype != "auto",
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ConfigError(f"{ENV}: streamkv's vLLM backend does not support {', '.join(bad)}; unset {ENV}")
        self.codec = codec_for(head_size)  # checks the head size before any weight loads
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if kv_cache.dtype != torch.uint8:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        n = slot_mapping.shape[0]
        keep = slot_mapping >= 0
        slots, key, value = slot_mapping, key[:n], value[:n]
        if not bool(keep.all()):  # padded entries (-1) store nothing
            slots, key, value = slots[keep], key[keep], value[keep]
        if slots.numel() == 0:
            return
        if not store(self.codec, key, value, kv_cache, slots):  # without numba: torch ops
            block_size = kv_cache.shape[2]
            slot_words = self.codec.encode(key, value).unflatten(-1, (-1, WORD))
            by_token(kv_cache)[slots // block_size, :, slots % block_size] = slot_words
        StreamKVAttentionImpl.calls["update"] += 1

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        md = attn_metadata
        if md is None or kv_cache.dtype != torch.uint8:
            return super().forward(layer, query, key, value, kv_cache, md, output, output_scale, output_block_scale)
        StreamKVAttentionImpl.calls["forward"] += 1
        plan = StepPlan.of(md, kv_cache.shape[2])
        dense = plan.dense
        if plan.decode is not None and not self._decode(plan, query, key, value, kv_cache, output):
            dense = plan.everything()  # no numba: every sequence through the read path
        elif plan.decode is not None and dense is not None:
            StreamKVAttentionImpl.calls["mixed"] += 1
        if dense is not None:
            self._dense(layer, plan, dense, query, key, value, kv_cache, output)
        return output

    def _decode(self, plan: StepPlan, query, key, value, kv_cache, output) -> bool:
        """One-token queries straight from the packed slots (``numba_decode.py``); False without numba."""
        dec = plan.decode
        if not decode(self.codec, kv_cache, dec.table, dec.past, dec.rows, query, key, value, output, self.scale):
            return False
        StreamKVAttentionImpl.calls["fused_decode"] += 1
        StreamKVAttentionImpl.calls["read"] += dec.history
        return True

    def _dense(self, layer, plan: StepPlan, dense: Dense, query, key, value, kv_cache, output) -> None:
        """The read path for ``dense``'s sequences: transient bf16 pages, then vLLM's kernel."""
        (_, heads, block_size, _), dtype, d = kv_cache.shape, query.dtype, self.head_size
        md = plan.metadata(dense, self.num_heads, self.num_kv_heads, d, dtype, layer.isa)
        n = md.num_actual_tokens
        rows = slice(0, n) if dense.rows is None else dense.rows
        query, key, value = query[rows], key[rows], value[rows]
        shape = (len(dense.pages), heads, block_size, 2 * d)
        out = plan.buffer("out", (n, self.num_heads, d), dtype)
        if dense.history == 0:  # nothing stored is read: stock numerics, no rotation
            scratch = torch.zeros(shape, dtype=dtype)
            super().do_kv_cache_update(layer, key, value, scratch, dense.new_slots)
            super().forward(layer, query, key, value, scratch, md, out)
            output[rows] = out.view(n, *output.shape[1:])
            return
        StreamKVAttentionImpl.calls["read"] += dense.history
        scratch = plan.buffer("pages", shape, dtype)  # every slot of it is written below
        k_new, v_new = self.codec.rotate(key, dtype), self.codec.rotate(value, dtype)
        if read_pages(self.codec, kv_cache, dense.pages, scratch, layer.isa):  # whole pages, straight into place
            super().do_kv_cache_update(layer, k_new, v_new, scratch, dense.new_slots)  # own tokens: full precision
            StreamKVAttentionImpl.calls["compiled"] += 1
        else:  # without numba: torch ops into token rows, then vLLM's own store
            tokens = len(dense.pages) * block_size
            k_rot, v_rot = (plan.buffer(x, (tokens, heads, d), dtype) for x in "kv")
            packed = by_token(kv_cache).index_select(0, dense.pages).transpose(1, 2).reshape(tokens, heads, -1)
            self.codec.dequantize_into(packed, k_rot, v_rot)  # the unused tails are never attended
            k_rot[dense.new_slots], v_rot[dense.new_slots] = k_new, v_new
            super().do_kv_cache_update(layer, k_rot, v_rot, scratch, torch.arange(tokens))
        super().forward(layer, self.codec.rotate(query, dtype), key, value, scratch, md, out)
        output[rows] = self.codec.unrotate(out, dtype).view(n, *output.shape[1:])
