"""lm-evaluation-harness tasks scored through the compressed cache (:class:`StreamingCacheLM`).

Local tasks work offline on any ``data`` (their YAML lives in ``streamkv/lab/lm_eval/tasks``; their
documents are built here from the run's text and the model's tokenizer and handed over as jsonl
files): ``streamkv_rolling`` (document perplexity), ``streamkv_lastword`` (LAMBADA-style last word),
``streamkv_passkey`` and RULER's eleven synthetic tasks (``streamkv_niah_single_1`` ...
``streamkv_fwe``, group ``streamkv_ruler``), the long-context ones scored per length and depth.
Stock lm-eval task names (``ruler``, ``longbench``, ``hellaswag``, ...) work where the hub is reachable.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ...kv.errors import ConfigError, check, one_of
from ...kv.model_facts import max_positions
from ..context import RunContext
from ..lm_eval import catalog
from ..registry import register
from ..runs.memory import PeakMemory

PASSKEY_ANSWER_TOKENS = 8  # max_gen_toks of streamkv_passkey.yaml
RULER_ANSWER_TOKENS = 128  # the longest max_gen_toks of the RULER tasks (needles)


@register("task", "lm_eval")
@dataclass
class LmEval:
    """Run lm-eval tasks ``names`` on the model with the composed compression.

    ``limit`` bounds the documents per task (null = all). ``max_length`` is the context window of the
    harness (rolling windows, left truncation; null = the model's positions). The ``*_words`` knobs size
    the local tasks' documents; ``passkey_*`` set the passkey prompts: total tokens, where the key sits
    (0 = start of the filler, 1 = just before the question), prompts per depth, and the filler
    (``repeat``: the classic sentences; ``text``: random stretches of the run's text).

    RULER's tasks: prompts of each of ``lengths`` tokens (the model's own), needles at each of
    ``depths``, ``samples`` prompts per (length, depth) (per length for vt/cwe/fwe), seeded by ``seed``
    (the same prompts for every configuration of a sweep). ``compress_question``: false (the field's
    protocol, kvpress's) compresses the context and asks the question and decodes the answer at full
    precision beside it; true streams them through the compressor too. ``max_gen_toks`` caps every
    generation task's answer (null: each task's own, RULER's ``tokens_to_generate``).
    """

    names: List[str] = field(default_factory=lambda: ["streamkv_lastword", "streamkv_passkey"])
    limit: Optional[int] = 20
    num_fewshot: Optional[int] = None
    batch_size: int = 1
    bootstrap_iters: int = 100
    max_length: Optional[int] = None
    rolling_words: int = 1000
    lastword_words: int = 100
    passkey_length: int = 1024
    passkey_depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_samples: int = 4
    passkey_filler: str = "repeat"
    lengths: List[int] = field(default_factory=lambda: [2048, 4096])
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 1
    compress_question: bool = False
    max_gen_toks: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        check(len(self.names) >= 1, "task.names is empty; e.g. task.names=[streamkv_lastword]")
        catalog.check_local_names(list(self.names))
        check(self.limit is None or self.limit >= 1, f"task.limit={self.limit} must be >= 1 (or null for all)")
        check(self.batch_size == 1, f"task.batch_size={self.batch_size}: only 1 (one compressed cache per sequence)")
        check(self.num_fewshot is None or self.num_fewshot >= 0, f"task.num_fewshot={self.num_fewshot} must be >= 0")
        check(self.max_length is None or self.max_length >= 2, f"task.max_length={self.max_length} must be >= 2")
        check(self.rolling_words >= 1, f"task.rolling_words={self.rolling_words} must be >= 1")
        check(self.lastword_words >= 4, f"task.lastword_words={self.lastword_words} must be >= 4")
        check(self.passkey_samples >= 1, f"task.passkey_samples={self.passkey_samples} must be >= 1")
        check(len(self.passkey_depths) >= 1, "task.passkey_depths is empty")
        check(all(0 <= d <= 1 for d in self.passkey_depths), f"task.passkey_depths={self.passkey_depths}: each in [0, 1]")
        one_of("task.passkey_filler", self.passkey_filler, ("repeat", "text"))
        check(len(self.lengths) >= 1 and all(n >= 1 for n in self.lengths), f"task.lengths={self.lengths}: one or more token counts >= 1")
        check(len(self.depths) >= 1, "task.depths is empty; e.g. task.depths=[0,0.5,1]")
        check(all(0 <= d <= 1 for d in self.depths), f"task.depths={self.depths}: each must be in [0, 1] (0 = start of the haystack, 1 = its end)")
        check(self.samples >= 1, f"task.samples={self.samples} must be >= 1")
        check(self.max_gen_toks is None or self.max_gen_toks >= 1, f"task.max_gen_toks={self.max_gen_toks} must be >= 1 (or null)")

    @property
    def ruler(self) -> list[str]:
        return [n for n in catalog.expand(list(self.names)) if n in catalog.RULER]

    def precheck(self, positions: int | None, text: str) -> int:
        """Before the weights load: the context (``max_length``, else the model's positions) fits the
        model and holds the passkey and RULER prompts with their answers. Returns it: the longest
        sequence the harness feeds."""
        max_length = self.max_length or positions or 2048
        check(positions is None or max_length <= positions, f"task.max_length={max_length} exceeds the model's {positions} positions")
        if catalog.PASSKEY in self.names:
            check(
                self.passkey_length + PASSKEY_ANSWER_TOKENS <= max_length,
                f"task.passkey_length={self.passkey_length} plus a {PASSKEY_ANSWER_TOKENS}-token answer exceeds "
                f"the context of {max_length} tokens (the model's max positions or task.max_length)",
            )
        if self.ruler:
            longest, answer = max(self.lengths), self.max_gen_toks or RULER_ANSWER_TOKENS
            check(
                longest + answer <= max_length,
                f"task.lengths={self.lengths}: {longest} tokens plus a {answer}-token answer exceed the "
                f"context of {max_length} tokens (the model's max positions or task.max_length)",
            )
        return max_length

    def run(self, ctx: RunContext) -> dict:
        from lm_eval import simple_evaluate

        from ..lm_eval import results
        from ..lm_eval.model import StreamingCacheLM

        os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap stderr would fork a pool per metric
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        max_length = self.precheck(max_positions(ctx.model), "")
        with tempfile.TemporaryDirectory(prefix="streamkv-lm-eval-") as docs_dir:
            meta = {"streamkv_docs": docs_dir, "pretrained": getattr(ctx.tokenizer, "name_or_path", None),
                    "max_seq_lengths": list(self.lengths)}  # the last two: lm-eval's stock ruler
            manager = catalog.task_manager(list(self.names), meta)  # checks the names first
            self._write_docs(ctx, Path(docs_dir))
            tasks = [t for name in self.names for t in catalog.load(manager, name)]
            lm = StreamingCacheLM(ctx, max_length, compress_question=self.compress_question)
            t0 = time.perf_counter()
            with PeakMemory(next(ctx.model.parameters()).device) as memory:
                out = simple_evaluate(
                    model=lm, tasks=tasks, task_manager=manager, num_fewshot=self.num_fewshot, batch_size=1,
                    limit=self.limit, bootstrap_iters=self.bootstrap_iters,
                    gen_kwargs={"max_gen_toks": self.max_gen_toks} if self.max_gen_toks else None,
                    log_samples=catalog.PASSKEY in self.names or bool(self.ruler),
                    random_seed=self.seed, numpy_random_seed=self.seed, torch_random_seed=self.seed, fewshot_random_seed=self.seed,
                )
            seconds = time.perf_counter() - t0
        per_task = results.per_task(out)
        result = {
            "metrics": {f"{t}/{m}": v for t, ms in per_task.items() for m, v in ms.items() if not m.endswith("_stderr")},
            "lm_eval": per_task,
            "task_versions": out.get("versions", {}),
            "n_shot": out.get("n-shot", {}),
            "n_samples": out.get("n-samples", {}),
            "limit": self.limit,
            "protocol": {"compress_question": self.compress_question, "bos": lm.bos, "max_gen_toks": self.max_gen_toks,
                         "context_prefills": lm.context_prefills, "questions": lm.questions},
            "speed": {"seconds": seconds},
            "memory": memory.as_dict(),
        }
        stats = ctx.compression_stats()
        if stats is not None:
            result["compression"] = stats
        return result

    # -- documents ----------------------------------------------------------------------------------
    def _write_docs(self, ctx: RunContext, root: Path) -> None:
        """Build the requested local tasks' documents from the run's text; one jsonl file per task."""
        from dataclasses import asdict

        from ..lm_eval.docs import lastword_docs, rolling_docs
        from ..longctx import generate
        from ..longctx.passkey import passkey_docs

        wanted = [n for n in catalog.expand(list(self.names)) if n in catalog.DOCUMENTS]
        needs_text = any(n not in (catalog.PASSKEY, *catalog.RULER) for n in wanted) or (
            catalog.PASSKEY in wanted and self.passkey_filler == "text") or bool(self.ruler)
        text = ctx.load_text() if wanted and needs_text else None
        builders = {
            "streamkv_rolling": lambda: rolling_docs(text, self.rolling_words),
            "streamkv_lastword": lambda: lastword_docs(text, self.lastword_words),
            catalog.PASSKEY: lambda: passkey_docs(ctx.tokenizer, self.passkey_length, self.passkey_depths, self.passkey_samples,
                                                  self.seed, text if self.passkey_filler == "text" else None),
        }
        for name in self.ruler:  # prompts of every length, in one file: the length is a field of each
            builders[name] = lambda name=name: [asdict(s) for n in self.lengths for s in generate(
                catalog.ruler_task(name), ctx.tokenizer, n, self.depths, self.samples, self.seed, haystack=text)]
        for name in wanted:
            try:
                docs = builders[name]()
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
            check(len(docs) > 0, f"{name}: the text yields no documents (is it shorter than one passage?)")
            with open(root / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(d) + "\n" for d in docs)
