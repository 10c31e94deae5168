"""An lm-evaluation-harness model whose every score passes through the compressed KV cache.

lm-eval's stock ``HFLM`` scores a request with one forward pass and no cache, so KV compression never
touches its numbers. :class:`StreamingCacheLM` instead streams each request through a fresh cache from
the run's :class:`~streamkv.lab.context.RunContext`, with the project's chunked-prefill protocol
(:func:`~streamkv.lab.streaming.token_logprobs`):

- ``loglikelihood``: the context is prefilled in ``chunk_size`` chunks, then the continuation is fed
  as one more chunk and scored against the compressed context (its first token from the context's
  last logit). Tokenization, empty contexts and left truncation are lm-eval's own (``TemplateLM``),
  so with ``quantizer=none`` the scores equal ``HFLM``'s.
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens, each window
  streamed in chunks through a fresh cache (the streaming perplexity protocol).
- ``generate_until``: the prompt is prefilled in chunks (only the last position's logits computed),
  then greedy decoding goes token by token through the same compressed cache, stopping at ``until``
  strings, EOS or ``max_gen_toks``. A document that says which part of its prompt is the ``context``
  (the long-context tasks) is answered by the field's protocol (kvpress's): the context is prefilled
  once through the compressor for every question on it (each question decodes on a copy of that
  cache), and the question and the answer are compressed only with ``compress_question=True``.
"""

from __future__ import annotations

import copy
import logging

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from ...kv.model_facts import facts_of, max_positions
from ..context import RunContext
from ..streaming import prefill, token_logprobs

log = logging.getLogger(__name__)


class StreamingCacheLM(TemplateLM):
    """``lm_eval.api.model.LM`` over a :class:`RunContext`; batch size 1 (one cache per sequence)."""

    DEFAULT_MAX_GEN_TOKS = 256

    def __init__(self, ctx: RunContext, max_length: int | None = None, compress_question: bool = False):
        super().__init__()
        self.ctx = ctx
        self.model = ctx.model
        self.tokenizer = ctx.tokenizer
        self._max_length = max_length or max_positions(ctx.model) or 2048
        self.compress_question = compress_question
        facts = facts_of(ctx.model)
        self.bos = bool(facts.wants_bos) and facts.bos_token_id is not None  # the family needs BOS first (Gemma)
        self._bos_id = facts.bos_token_id
        self.context_prefills = 0  # contexts prefilled for generation (one per distinct context)
        self.questions = 0  # generation requests answered
        self._forkable = True  # whether a prefilled cache can be deep-copied (see _prefilled)
        self._warned_sampling = False

    # -- what TemplateLM needs (mirrors HFLM, so token ids are identical) -----------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **extra)
        if self.bos and (not ids or ids[0] != self._bos_id):  # as HFLM does for these families
            ids = [self._bos_id, *ids]
        return ids

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    # -- scoring ------------------------------------------------------------------------------------
    def _progress(self, items, desc: str, disable: bool = False):
        return tqdm(items, desc=desc, unit="req", disable=disable or not self.ctx.progress)

    def _prefill(self, ids: list[int]):
        """A fresh compressed cache holding ``ids`` streamed in chunks, and the last position's logits."""
        cache = self.ctx.new_cache()
        _, last = token_logprobs(self.model, torch.tensor(ids), cache, self.ctx.chunk_size)
        return cache, last

    def _prefilled(self, ids: list[int], memo: dict):
        """Like :meth:`_prefill`, but consecutive requests with the same context (multiple choice)
        prefill it once and each score on a copy of that cache."""
        key = tuple(ids)
        if self._forkable and memo.get("key") == key:
            try:
                return copy.deepcopy(memo["cache"]), memo["last"]
            except Exception:  # noqa: BLE001 - a wrapped peer cache may not copy: prefill again
                self._forkable = False
        cache, last = self._prefill(ids)
        if self._forkable:
            try:
                memo.update(key=key, cache=copy.deepcopy(cache), last=last)
            except Exception:  # noqa: BLE001
                self._forkable = False
        return cache, last

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out, memo = [], {}
        for _, context, continuation in self._progress(requests, "loglikelihood", disable_tqdm):
            # HFLM's left truncation: keep the last max_length + 1 tokens, the continuation whole if it fits
            seq = (context + continuation)[-(self.max_length + 1) :]
            n = min(len(continuation), len(seq) - 1)
            cache, last = self._prefilled(seq[:-n], memo)
            lp, _, greedy = token_logprobs(self.model, torch.tensor(seq[-n:]), cache, [n], prev_logits=last, greedy=True)
            out.append((lp.sum().item(), bool(greedy.all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in self._progress([r.args for r in requests], "loglikelihood_rolling", disable_tqdm):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            total = 0.0
            for context, continuation in map(make_disjoint_window, windows):
                window = torch.tensor(context + continuation)
                lp, _ = token_logprobs(self.model, window, self.ctx.new_cache(), self.ctx.chunk_size)
                total += lp[-len(continuation) :].sum().item()
            out.append(total)
        return out

    # -- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode([self.eot_token_id])
        jobs = []  # (index, context ids, question ids, max_gen_toks, until)
        for i, req in enumerate(requests):
            prompt, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample") and not self._warned_sampling:
                log.warning("StreamingCacheLM decodes greedily; do_sample/temperature are ignored")
                self._warned_sampling = True
            ids = self.tok_encode(prompt)[-max(self.max_length - max_gen_toks, 1) :]
            cut = self._context_tokens(prompt, ids, getattr(req, "doc", None))
            jobs.append((i, ids[:cut], ids[cut:], max_gen_toks, until))
        groups: dict[tuple, list] = {}  # a context several questions share is prefilled once
        for job in jobs:
            groups.setdefault(tuple(job[1]), []).append(job)
        out: list[str] = [""] * len(jobs)
        bar = self._progress(range(len(jobs)), "generate_until", disable_tqdm)
        for context, group in groups.items():
            prefilled = self._prefill_context(list(context)) if context else None
            for n, (i, _, question, max_gen_toks, until) in enumerate(group):
                start = prefilled if prefilled is None or n == len(group) - 1 else copy.deepcopy(prefilled)
                text = self.tok_decode(self._greedy(start, question, max_gen_toks, until))
                out[i] = postprocess_generated_text(text, stop=until, think_end_token=None)
                bar.update(1)
        bar.close()
        return out

    def _context_tokens(self, prompt: str, ids: list[int], doc: dict | None) -> int:
        """How many of the prompt's tokens ``ids`` are its context: where the document's ``context``
        text ends (by the tokenizer's character offsets), or 0 for a prompt without one (all question:
        the whole prompt streams through the compressor, as before)."""
        context = doc.get("context") if isinstance(doc, dict) else None
        if not context or not prompt.startswith(context) or len(ids) != len(self.tok_encode(prompt)):
            return 0  # not a context + question prompt, or left-truncated: no split
        enc = self.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=not prompt.startswith(self.tokenizer.bos_token or "\0"))
        if enc["input_ids"] != ids:
            return 0
        ends = [start >= len(context) and end > start for start, end in enc["offset_mapping"]]
        return ends.index(True) if True in ends else len(ids)

    def _prefill_context(self, ids: list[int]) -> tuple:
        """A fresh cache holding the context ``ids`` (compressed as it streams) and its last logits."""
        cache = self.ctx.new_cache()
        self.context_prefills += 1
        return cache, prefill(self.model, torch.tensor(ids), cache, self.ctx.chunk_size)

    def _greedy(self, prefilled: tuple | None, question: list[int], max_new: int, until: list[str]) -> list[int]:
        """Greedy tokens after the question, decoded one at a time through the cache of its context
        (a fresh one when the prompt has no context). The question and the answer stay at full
        precision unless ``compress_question``."""
        cache, last = prefilled if prefilled is not None else (self.ctx.new_cache(), None)
        self.questions += 1
        if prefilled is not None and not self.compress_question and hasattr(cache, "set_compressing"):
            cache.set_compressing(False)
        if question:
            last = prefill(self.model, torch.tensor(question), cache, self.ctx.chunk_size)
        new: list[int] = []
        while len(new) < max_new:
            token = int(last.argmax())
            new.append(token)
            if token == self.eot_token_id or any(s and s in self.tok_decode(new) for s in until):
                break
            last = prefill(self.model, torch.tensor([token]), cache, 1)
        return new
