"""What one step reads, worked out once and shared by its layers (vLLM hands every layer the same
metadata object; the plan rides on it).

A step's sequences split two ways. Those whose query is one token (decodes) attend straight from their
packed slots (:class:`Decode`, ``kernel.decode``). The others (prefill chunks) go through a transient
bf16 page set and vLLM's own kernel (:class:`Dense`): their packed pages in order, the block table
renumbered onto the transient pages, the transient slot of each new token. vLLM's CPU builder does not
put decodes first (its ``reorder_batch_threshold`` is None), so the two sets are index sets of rows;
where a step mixes them, the dense set gets its own metadata for vLLM's kernel (rebased query starts,
its sequences' lengths and block rows, and a scheduler metadata recomputed the way
``CPUAttentionMetadataBuilder.build`` does), built once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

_PLAN = "_streamkv_plan"


@dataclass
class Decode:
    """The sequences whose query is one token."""

    rows: torch.Tensor  # their token rows in the step (int64)
    table: torch.Tensor  # their rows of vLLM's block table: packed page ids (int32, contiguous)
    past: torch.Tensor  # tokens stored before this step, read from packed slots (int64)
    history: int  # their sum


@dataclass
class Dense:
    """Sequences read through transient bf16 pages and vLLM's kernel."""

    pages: torch.Tensor  # packed page ids, sequence by sequence
    table: torch.Tensor  # their block table over the transient pages
    new_slots: torch.Tensor  # transient slot of each of their tokens
    history: int  # tokens read back from packed slots
    rows: torch.Tensor | None  # their token rows in the step; None: every token of the step
    md: object  # vLLM's metadata over these sequences (a subset's lacks its scheduler metadata)
    schedules: dict = field(default_factory=dict)  # a subset's metadata per head geometry (StepPlan.metadata)

    @classmethod
    def build(cls, md, block_size: int, sel: torch.Tensor | None = None) -> Dense:
        """Over the sequences ``sel`` (indices), or all of them."""
        starts, seq_lens, bt = md.query_start_loc.long(), md.seq_lens.long(), md.block_table
        q_lens, rows = starts[1:] - starts[:-1], None
        if sel is not None:
            first, q_lens, seq_lens, bt = starts[:-1][sel], q_lens[sel], seq_lens[sel], bt[sel]
            starts = torch.cat([q_lens.new_zeros(1), torch.cumsum(q_lens, 0)])
            rows = torch.repeat_interleave(first - starts[:-1], q_lens) + torch.arange(int(starts[-1]))
        past = seq_lens - q_lens
        blocks = (seq_lens + block_size - 1) // block_size
        first_page = torch.cumsum(blocks, 0) - blocks
        cols = torch.arange(int(blocks.max()))
        used = cols < blocks[:, None]
        table = torch.zeros_like(bt)
        table[:, : len(cols)] = torch.where(used, first_page[:, None] + cols, 0)
        seq = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens)
        pos = past[seq] + torch.arange(len(seq)) - starts[:-1][seq]
        pages = bt[:, : len(cols)][used].long()
        if sel is None:
            sub = replace(md, block_table=table)
        else:
            sub = replace(md, num_actual_tokens=len(rows), max_query_len=int(q_lens.max()),
                          query_start_loc=starts.to(md.query_start_loc.dtype), max_seq_len=int(seq_lens.max()),
                          seq_lens=md.seq_lens[sel], block_table=table, slot_mapping=md.slot_mapping[rows],
                          scheduler_metadata=None)
        return cls(pages, table, first_page[seq] * block_size + pos, int(past.sum()), rows, sub)


@dataclass
class StepPlan:
    """One step: its decodes, its dense set (the other sequences), scratch buffers for every layer."""

    md: object
    block_size: int
    decode: Decode | None  # None: no sequence has a one-token query
    dense: Dense | None  # the sequences not in ``decode``; None: there are none
    buffers: dict = field(default_factory=dict)  # transient tensors, reused by every layer of the step
    _all: Dense | None = None

    @classmethod
    def of(cls, md, block_size: int) -> StepPlan:
        plan = getattr(md, _PLAN, None)
        if plan is None:
            plan = cls.build(md, block_size)
            setattr(md, _PLAN, plan)
        return plan

    @classmethod
    def build(cls, md, block_size: int) -> StepPlan:
        starts, seq_lens = md.query_start_loc.long(), md.seq_lens.long()
        q_lens = starts[1:] - starts[:-1]
        one = q_lens == 1
        if not bool(one.any()):
            return cls(md, block_size, None, Dense.build(md, block_size))
        past = (seq_lens - q_lens)[one]
        decode = Decode(starts[:-1][one], md.block_table[one].to(torch.int32).contiguous(), past, int(past.sum()))
        rest = torch.nonzero(q_lens > 1).flatten()  # padded requests (no query) are in neither set
        return cls(md, block_size, decode, Dense.build(md, block_size, rest) if len(rest) else None)

    def everything(self) -> Dense:
        """Every sequence as a dense one (where the fused decode is not available)."""
        if self._all is None:
            self._all = Dense.build(self.md, self.block_size)
        return self._all

    def metadata(self, dense: Dense, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 isa: str):
        """``dense.md`` with a scheduler metadata: vLLM's own for the whole step, else computed once per
        step (and head geometry) as vLLM's builder does."""
        if dense.rows is None:
            return dense.md
        key = (num_heads, num_kv_heads, head_dim, dtype, isa)
        if key not in dense.schedules:
            from vllm import _custom_ops as ops
            from vllm import envs

            m = dense.md
            dense.schedules[key] = replace(m, scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(m.seq_lens), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                seq_lens=m.seq_lens, dtype=dtype, query_start_loc=m.query_start_loc, causal=m.causal,
                sliding_window_size=-1, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
                kv_cache_dtype="auto"))  # no sliding window, kv_cache_dtype "auto": the backend refuses others
        return dense.schedules[key]

    def buffer(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        b = self.buffers.get(name)
        if b is None or b.shape != shape or b.dtype != dtype:
            b = self.buffers[name] = torch.empty(shape, dtype=dtype)
        return b
