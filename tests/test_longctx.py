"""Long-context evaluation through the compressed cache: RULER via lm-eval on a tiny model, the field's
protocol (the question uncompressed; a shared context prefilled once), BOS for the families that need
it, the RULER table and the needle heatmap, and bad input in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamkv.kv.errors import ConfigError
from streamkv.lab.compression import build_compression
from streamkv.lab.context import RunContext
from streamkv.lab.lm_eval.model import StreamingCacheLM
from streamkv.lab.tasks.lm_eval import LmEval

REPO = Path(__file__).resolve().parent.parent
FOUR_BIT = {"name": "uniform", "key_bits": 4, "value_bits": 4, "key_group_size": 16, "value_group_size": 16}


@pytest.fixture(scope="module")
def prose() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics.values())[:40_000]


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def embedded_tok():
    """The embedded model's tokenizer (a real BPE: RULER's prompts are sized in real tokens)."""
    from transformers import AutoTokenizer

    from streamkv.lab.models.embedded import converted_dir

    path = converted_dir()
    if not path.is_dir():
        pytest.skip("the embedded model is not installed (bash install.sh)")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny_long(embedded_tok):
    """A tiny random GQA Llama over the embedded tokenizer's vocabulary, with 4096 positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(embedded_tok), num_hidden_layers=2, max_position_embeddings=4096, hidden_size=64,
                         intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def context_for(model, tok, text: str, quantizer=FOUR_BIT, chunk_size: int = 16) -> RunContext:
    return RunContext(model, tok, build_compression(quantizer, "none", "none"), chunk_size, lambda: text, progress=False)


@pytest.fixture
def local_tasks_only(monkeypatch):
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager  # skip indexing lm-eval's ~15k stock tasks (slow)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: real(**{**kw, "include_defaults": False}))


def test_every_ruler_task_runs_through_the_cache(tiny_long, embedded_tok, prose, local_tasks_only, one_thread):
    """The group runs each of RULER's eleven tasks on the tiny model through a 4-bit cache: a score per
    task, per length and depth, the RULER average, and the protocol that was used."""
    ctx = context_for(tiny_long, embedded_tok, prose, chunk_size=256)
    out = LmEval(names=["streamkv_ruler"], lengths=[1200], depths=[0.5], samples=1, limit=None, bootstrap_iters=0,
                 max_gen_toks=8).run(ctx)
    from streamkv.lab.longctx import TASKS

    for task in TASKS:
        scores = out["lm_eval"][f"streamkv_{task}"]
        assert 0 <= scores["score"] <= 1 and "score_len_1200" in scores
        if task.startswith("niah"):
            assert "score_len_1200_depth_0.5" in scores
    assert out["lm_eval"]["ruler_average"]["tasks"] == len(TASKS) and "streamkv_ruler/score" in out["metrics"]
    assert out["protocol"] == {"compress_question": False, "bos": False, "max_gen_toks": 8, "context_prefills": len(TASKS),
                               "questions": len(TASKS)}
    assert out["compression"]["avg_key_bits"] < 32 and out["memory"]["peak_rss_mib"] > 0


def _request(prompt: str, doc: dict, max_gen_toks: int = 4):
    from lm_eval.api.instance import Instance

    return Instance("generate_until", doc, (prompt, {"until": [], "max_gen_toks": max_gen_toks}), 0)


def test_compress_question_changes_what_is_stored_not_the_prompt(tiny_llama, tiny_tok, prose, monkeypatch):
    """The same tokens are fed either way; only with ``compress_question`` do the question's tokens
    (which complete the context's last group) end up compressed."""
    from streamkv.lab.lm_eval import model as adapter

    context, question = prose[:150], " What is the answer? The answer is"  # 150: not a whole number of groups
    fed, stored = {}, {}
    real = adapter.prefill
    for flag in (False, True):
        calls = []
        monkeypatch.setattr(adapter, "prefill", lambda m, ids, *a, **k: calls.append(ids.tolist()) or real(m, ids, *a, **k))
        ctx = context_for(tiny_llama, tiny_tok, prose)
        lm = StreamingCacheLM(ctx, 512, compress_question=flag)
        lm.generate_until([_request(context + question, {"context": context})])
        fed[flag] = [t for c in calls for t in c]
        stored[flag] = ctx.compression_stats()["bytes_by_part"]["key"]
    assert fed[False] == fed[True]  # the prompt (and the greedy answer) are the same tokens
    assert len(fed[False]) > len(tiny_tok.encode(context + question))
    assert stored[False]["residual"] > stored[True]["residual"] and stored[False]["body"] < stored[True]["body"]


def test_a_shared_context_is_prefilled_once_and_each_question_answers_on_a_copy(tiny_llama, tiny_tok, prose):
    context = prose[:300]
    questions = [" First question?", " Second question, longer?", " First question?"]
    ctx = context_for(tiny_llama, tiny_tok, prose)
    lm = StreamingCacheLM(ctx, 512)
    together = lm.generate_until([_request(context + q, {"context": context}, 6) for q in questions])
    assert lm.context_prefills == 1 and lm.questions == 3
    alone = [StreamingCacheLM(ctx, 512).generate_until([_request(context + q, {"context": context}, 6)])[0] for q in questions]
    assert together == alone and together[0] == together[2]


def test_a_family_that_needs_bos_gets_it_first_in_perplexity_and_generation(tiny_llama_dir):
    """Gemma-3 (tiny, random): every perplexity window and every generation prompt starts with BOS,
    and the results say so; Llama does not get one added."""
    from conftest import tiny_family_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamkv.lab.tasks.perplexity import Perplexity

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_family_config("gemma3_text", max_position_embeddings=1024)).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)  # char-level, adds no BOS of its own
    firsts = []
    model.register_forward_pre_hook(lambda m, args, kw: firsts.append(int(kw["input_ids"][0, 0])), with_kwargs=True)
    ctx = RunContext(model, tok, build_compression("none", "none", "none"), 16, lambda: "abcdefgh " * 40, progress=False)
    out = Perplexity(window=32, max_windows=2, kl=False).run(ctx)
    bos = model.config.bos_token_id
    assert out["protocol"] == {"bos": True} and out["metrics"]["tokens"] == 2 * 31
    assert firsts[0] == bos and firsts[2] == bos  # the first chunk of each window (two chunks of 16 per window)
    lm = StreamingCacheLM(ctx, 256)
    assert lm.bos and lm.tok_encode("abc")[0] == bos


def test_the_report_writes_the_ruler_table_and_the_needle_heatmap(tmp_path):
    from streamkv.lab.reports.sweep import make_report

    def job(name, quantizer, scale, bits):
        d = tmp_path / "sweep" / name
        d.mkdir(parents=True)
        cells = {f"score_len_{n}_depth_{dp:g}": scale * (1 - dp / 2) for n in (2048, 4096) for dp in (0.0, 0.5, 1.0)}
        lm = {"streamkv_niah_single_1": {"score": scale * 0.75, "score_len_2048": scale, "score_len_4096": scale * 0.5, **cells},
              "ruler_average": {"score": scale * 0.75, "score_len_2048": scale, "score_len_4096": scale * 0.5, "tasks": 1}}
        (d / "results.json").write_text(json.dumps({
            "task": "lm_eval", "components": {"quantizer": quantizer}, "config": {"name": "longctx"},
            "lm_eval": lm, "metrics": {}, "compression": {"avg_bits": bits}, "protocol": {"compress_question": False}}))
        (d / ".hydra").mkdir()
        (d / ".hydra" / "overrides.yaml").write_text(f"- method={name}\n")

    job("baseline", "none", 1.0, 32.0)
    job("kv4", "lloyd_max", 0.9, 4.24)
    report = make_report(tmp_path / "sweep")
    assert {"ruler", "ruler_csv", "heatmap"} <= set(report.files) and report.files["heatmap"].stat().st_size > 1000
    text = report.files["ruler"].read_text()
    assert "| method=kv4 | 4.24 | False | 0.9 | 0.45 | 0.9 | 0.45 | 0.675 | 90 | 90 |" in text


@pytest.mark.parametrize("override,message", [
    ("task.depths=[0.5,1.5]", "task.depths=[0.5, 1.5]: each must be in [0, 1]"),
    ("task.names=[streamkv_niah_single_9]", "are not streamkv tasks; choose from ['streamkv_rolling'"),
    ("task.lengths=[1000]", "task.lengths=[1000]: 1000 tokens plus a 128-token answer exceed the context of 1024 tokens"),
    ("data.path=__SHORT__", "streamkv_niah_single_2: the haystack has"),
])
def test_bad_long_context_input_is_one_line_and_writes_nothing(tiny_llama_dir, tmp_path, override, message):
    short = tmp_path / "short.txt"
    short.write_text("A short text. " * 40)
    run_dir = tmp_path / "run"
    args = [f"model.path={tiny_llama_dir}", "data=text_file", f"data.path={short}", "task=lm_eval", "chunk_size=16",
            "task.names=[streamkv_niah_single_2]", "task.lengths=[600]", "progress=false", "sink=none", "outlier=none",
            "quantizer.key_group_size=16", "quantizer.value_group_size=16", f"hydra.run.dir={run_dir}", override.replace("__SHORT__", str(short))]
    env = {"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "runners.eval", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, **env})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and lines and lines[-1].startswith("error: ") and message in lines[-1], out.stderr[-1500:]
    assert "Traceback" not in out.stderr and not (run_dir / "results.json").exists()


def test_stock_ruler_gets_the_tokenizer_and_lengths_it_needs(tiny_long, embedded_tok, prose, monkeypatch):
    """lm-eval's stock ``ruler`` group reads ``pretrained`` (a tokenizer) and ``max_seq_lengths`` from
    the task manager's metadata: the run hands over the model's tokenizer and ``task.lengths``.
    Offline its data cannot load (nltk, the hub), which is one line."""
    import lm_eval.tasks

    seen = {}

    class Manager:
        all_tasks = ["ruler"]

        def __init__(self, **kw):
            seen.update(kw)

        def load(self, name):
            raise OSError("nltk data unavailable offline")

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Manager)
    ctx = context_for(tiny_long, embedded_tok, prose)
    with pytest.raises(ConfigError, match=r"lm-eval task 'ruler' cannot load its data set .*offline"):
        LmEval(names=["ruler"], lengths=[4096, 8192]).run(ctx)
    assert seen["metadata"]["max_seq_lengths"] == [4096, 8192] and seen["metadata"]["pretrained"]
