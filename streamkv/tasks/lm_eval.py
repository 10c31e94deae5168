"""lm-evaluation-harness tasks scored through the compressed cache (:class:`StreamingCacheLM`).

Three local tasks work offline on any ``data`` (their YAML lives in ``streamkv/lm_eval_tasks``; their
documents are built here from the run's text and handed over as jsonl files): ``streamkv_rolling``
(document perplexity), ``streamkv_lastword`` (LAMBADA-style last word) and ``streamkv_passkey``
(passkey retrieval, reported per depth). Stock lm-eval task names work where the hub is reachable.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from .. import network
from ..context import RunContext
from ..kv.errors import ConfigError, check, one_of
from ..kv.model_facts import max_positions
from ..registry import register

TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"
LOCAL = ("streamkv_rolling", "streamkv_lastword", "streamkv_passkey")
PASSKEY_ANSWER_TOKENS = 8  # max_gen_toks of streamkv_passkey.yaml


@register("task", "lm_eval")
@dataclass
class LmEval:
    """Run lm-eval tasks ``names`` on the model with the composed compression.

    ``limit`` bounds the documents per task (null = all). ``max_length`` is the context window of the
    harness (rolling windows, left truncation; null = the model's positions). The ``*_words`` knobs size
    the local tasks' documents; ``passkey_*`` set the passkey prompts: total tokens, where the key sits
    (0 = start of the filler, 1 = just before the question), prompts per depth, and the filler
    (``repeat``: the classic sentences; ``text``: random stretches of the run's text).
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
    seed: int = 0

    def __post_init__(self) -> None:
        check(len(self.names) >= 1, "task.names is empty; e.g. task.names=[streamkv_lastword]")
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

    def precheck(self, positions: int | None, text: str) -> int:
        """Before the weights load: the context (``max_length``, else the model's positions) fits the
        model and holds a passkey prompt. Returns it: the longest sequence the harness feeds."""
        max_length = self.max_length or positions or 2048
        check(positions is None or max_length <= positions, f"task.max_length={max_length} exceeds the model's {positions} positions")
        if "streamkv_passkey" in self.names:
            check(
                self.passkey_length + PASSKEY_ANSWER_TOKENS <= max_length,
                f"task.passkey_length={self.passkey_length} plus a {PASSKEY_ANSWER_TOKENS}-token answer exceeds "
                f"the context of {max_length} tokens (the model's max positions or task.max_length)",
            )
        return max_length

    def run(self, ctx: RunContext) -> dict:
        from lm_eval import simple_evaluate

        from ..lm_eval_model import StreamingCacheLM

        os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap stderr would fork a pool per metric
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        max_length = self.precheck(max_positions(ctx.model), "")
        with tempfile.TemporaryDirectory(prefix="streamkv-lm-eval-") as docs_dir:
            manager = self._task_manager(docs_dir)  # checks the names first
            self._write_docs(ctx, Path(docs_dir))
            tasks = [t for name in self.names for t in self._load(manager, name)]
            t0 = time.perf_counter()
            out = simple_evaluate(
                model=StreamingCacheLM(ctx, max_length),
                tasks=tasks,
                task_manager=manager,
                num_fewshot=self.num_fewshot,
                batch_size=1,
                limit=self.limit,
                bootstrap_iters=self.bootstrap_iters,
                log_samples="streamkv_passkey" in self.names,
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
            )
            seconds = time.perf_counter() - t0
        return self._results(out, seconds, ctx)

    # -- documents and tasks ------------------------------------------------------------------------
    def _write_docs(self, ctx: RunContext, root: Path) -> None:
        """Build the requested local tasks' documents from the run's text; one jsonl file per task."""
        from ..lm_eval_docs import lastword_docs, rolling_docs
        from ..passkey import passkey_docs

        wanted = [n for n in self.names if n in LOCAL]
        needs_text = bool(set(wanted) - {"streamkv_passkey"}) or self.passkey_filler == "text"
        text = ctx.load_text() if wanted and needs_text else None
        builders = {
            "streamkv_rolling": lambda: rolling_docs(text, self.rolling_words),
            "streamkv_lastword": lambda: lastword_docs(text, self.lastword_words),
            "streamkv_passkey": lambda: passkey_docs(
                ctx.tokenizer,
                self.passkey_length,
                self.passkey_depths,
                self.passkey_samples,
                self.seed,
                text if self.passkey_filler == "text" else None,
            ),
        }
        for name in wanted:
            try:
                docs = builders[name]()
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
            check(len(docs) > 0, f"{name}: the text yields no documents (is it shorter than one passage?)")
            with open(root / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps(d) + "\n" for d in docs)

    def _task_manager(self, docs_dir: str):
        """Local tasks only (fast) unless a stock task is asked for; an unknown name fails in one line."""
        from lm_eval.tasks import TaskManager

        meta = {"streamkv_docs": docs_dir}
        if all(n in LOCAL for n in self.names):
            return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=meta)
        manager = TaskManager(include_path=str(TASKS_DIR), metadata=meta)
        unknown = [n for n in self.names if n not in manager.all_tasks]
        check(
            not unknown,
            f"task.names: {unknown} not lm-eval tasks; local (offline) tasks: {list(LOCAL)}, "
            "or any lm-eval task/group name (e.g. hellaswag, arc_easy, lambada_openai; these need the hub)",
        )
        return manager

    @staticmethod
    def _load(manager, name: str) -> list:
        """The top-level object(s) ``name`` denotes: a group, a task, or a tag's tasks."""
        if name not in LOCAL:
            network.use_hub(datasets=True)
        try:
            loaded = manager.load(name)
        except Exception as e:  # noqa: BLE001 - stock tasks fail offline in many ways
            if name in LOCAL:
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            offline = network.hub_offline(datasets=True)
            why = f"offline: {offline}" if offline else "the hub is needed"
            raise ConfigError(
                f"lm-eval task {name!r} cannot load its data set ({type(e).__name__}: {first}); stock tasks need "
                f"the Hugging Face hub ({why}) - offline, use {list(LOCAL)}"
            ) from None
        return [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())

    # -- results ------------------------------------------------------------------------------------
    def _results(self, out: dict, seconds: float, ctx: RunContext) -> dict:
        per_task = {name: _metrics(res) for name, res in {**out["results"], **out.get("groups", {})}.items()}
        by_depth = defaultdict(list)  # passkey accuracy per depth, from the per-document scores
        for sample in out.get("samples", {}).get("streamkv_passkey", []):
            by_depth[sample["doc"]["depth"]].append(sample["acc"])
        for depth, hits in sorted(by_depth.items()):
            per_task["streamkv_passkey"][f"acc_depth_{depth:g}"] = sum(hits) / len(hits)
        headline = {f"{t}/{m}": v for t, ms in per_task.items() for m, v in ms.items() if not m.endswith("_stderr")}
        result = {
            "metrics": headline,
            "lm_eval": per_task,
            "task_versions": out.get("versions", {}),
            "n_shot": out.get("n-shot", {}),
            "n_samples": out.get("n-samples", {}),
            "limit": self.limit,
            "speed": {"seconds": seconds},
        }
        stats = ctx.compression_stats()
        if stats is not None:
            result["compression"] = stats
        return result


def _metrics(res: dict) -> dict:
    """lm-eval's ``"acc,none"`` / ``"acc_stderr,none"`` keys as ``acc`` / ``acc_stderr`` (a filter other
    than ``none`` is kept as a suffix); non-numbers (``"N/A"`` stderrs, aliases) are left out."""
    out = {}
    for key, value in res.items():
        metric, _, filt = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and filt:
            out[metric if filt == "none" else f"{metric}[{filt}]"] = value
    return out
