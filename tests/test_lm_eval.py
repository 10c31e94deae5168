"""lm-eval through the compressed cache: HFLM parity uncompressed, 2-bit changes scores, passkey, runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamkv.kv.errors import ConfigError
from streamkv.lab.compression import build_compression
from streamkv.lab.context import RunContext
from streamkv.lab.lm_eval.docs import lastword_docs, rolling_docs
from streamkv.lab.lm_eval.model import StreamingCacheLM
from streamkv.lab.longctx.passkey import INTRO, NEEDLE, overhead, passkey_docs, passkey_match
from streamkv.lab.tasks.lm_eval import LmEval

REPO = Path(__file__).resolve().parent.parent
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 6
TWO_BIT = {"name": "uniform", "key_bits": 2, "value_bits": 2, "key_group_size": 16, "value_group_size": 16}


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def lm_for(model, tok, quantizer="none", chunk_size=16, max_length=None):
    ctx = RunContext(model, tok, build_compression(quantizer, "none", "none"), chunk_size, lambda: TEXT, progress=False)
    return StreamingCacheLM(ctx, max_length)


def requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


# contexts longer than a chunk, a shared multiple-choice context, an empty context
LL = requests("loglikelihood", [(TEXT, " cat"), (TEXT, " dog sleeps"), (TEXT[:40], " fox"), ("", "hello there")])
ROLLING = requests("loglikelihood_rolling", [(TEXT * 3,)])


def test_uncompressed_scores_equal_hflm(tiny_llama, tiny_tok):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=tiny_llama, tokenizer=tiny_tok, batch_size=1, max_length=256)
    ours = lm_for(tiny_llama, tiny_tok, max_length=256)  # several rolling windows over the 1.2k-token document
    for (a, ga), (b, gb) in zip(ours.loglikelihood(LL), hf.loglikelihood(LL)):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
    assert ours.loglikelihood_rolling(ROLLING) == pytest.approx(hf.loglikelihood_rolling(ROLLING), abs=1e-2)


def test_two_bit_cache_changes_scores(tiny_llama, tiny_tok):
    plain = [s for s, _ in lm_for(tiny_llama, tiny_tok).loglikelihood(LL[:3])]
    two_bit = [s for s, _ in lm_for(tiny_llama, tiny_tok, TWO_BIT).loglikelihood(LL[:3])]
    assert max(abs(a - b) for a, b in zip(plain, two_bit)) > 1e-3


def test_generation_is_greedy_through_the_cache_and_stops(tiny_llama, tiny_tok):
    lm = lm_for(tiny_llama, tiny_tok)
    prompt = TEXT[:40]  # several chunks of 16
    seq = tiny_tok.encode(prompt)
    with torch.no_grad():  # the reference: greedy decoding by full forwards, no cache
        for _ in range(8):
            seq.append(int(tiny_llama(torch.tensor([seq])).logits[0, -1].argmax()))
    want = tiny_tok.decode(seq[-8:]).split("<unk>")[0]  # <unk> is the tiny tokenizer's EOS
    (got,) = lm.generate_until(requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 8})]))
    assert got == want
    stop = want[3]
    (cut,) = lm.generate_until(requests("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 8})]))
    assert cut == want.split(stop)[0]


def test_passkey_sits_at_the_requested_depth(tiny_tok):
    depths = [0.0, 0.3, 1.0]
    docs = passkey_docs(tiny_tok, 400, depths, samples=2, seed=1)
    assert [d["depth"] for d in docs] == depths * 2  # sample by sample: a limit keeps every depth
    for d in docs:
        needle = NEEDLE.format(key=d["target"])
        assert needle in d["input"] and len(d["target"]) == 5
        budget = 400 - overhead(tiny_tok, int(d["target"]))  # filler tokens; one token per character
        start = d["input"].index(needle) - len(INTRO)
        assert abs(start / budget - d["depth"]) < 0.02 and abs(d["needle_depth"] - d["depth"]) < 0.01
        assert abs(len(tiny_tok.encode(d["input"])) - 400) <= 2
    assert len({d["target"] for d in docs}) == len(docs)


def test_passkey_scoring_counts_exact_matches():
    assert passkey_match(" 12345.", "12345") and passkey_match("12345 is it", "12345")
    assert not passkey_match(" 1234", "12345") and not passkey_match(" 123456", "12345")
    assert not passkey_match(" the key", "12345")


def test_documents_from_text():
    text = "\n\n".join(f"Paragraph {i} has some words in it, ending well." for i in range(30))
    pages = rolling_docs(text, 40)
    assert all(len(p["page"].split()) >= 40 for p in pages[:-1]) and "\n\n".join(p["page"] for p in pages) == text
    passages = lastword_docs(text, 25)
    assert len(passages) == 30 * 9 // 25
    for p in passages:
        assert p["target"].isalpha() and p["context"] and text.count(p["context"]) >= 1


def test_bad_input_is_one_config_error(tiny_llama, tiny_tok, monkeypatch):
    import lm_eval.tasks

    real = lm_eval.tasks.TaskManager  # skip indexing lm-eval's ~15k stock tasks (slow); the check is the same
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: real(**{**kw, "include_defaults": False}))
    with pytest.raises(ConfigError, match="task.limit=0"):
        LmEval(limit=0)
    ctx = lm_for(tiny_llama, tiny_tok).ctx
    with pytest.raises(ConfigError, match="passkey_length=1020"):
        LmEval(names=["streamkv_passkey"], passkey_length=1020).run(ctx)  # the tiny model has 1024 positions
    with pytest.raises(ConfigError, match="not lm-eval tasks.*streamkv_lastword"):
        LmEval(names=["streamkv_lastword", "no_such_task"]).run(ctx)


@pytest.mark.integration
def test_runner_end_to_end_on_the_embedded_model(embedded, tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    args = [
        "task=lm_eval", "task.names=[streamkv_lastword,streamkv_passkey]", "task.limit=1", "task.lastword_words=30",
        "task.passkey_length=96", "task.passkey_depths=[0.5]", "task.passkey_samples=1", "chunk_size=64",
        "quantizer.key_bits=2", "quantizer.value_bits=2", "quantizer.key_group_size=64", "sink=none", "outlier=none",
        "progress=false", f"hydra.run.dir={tmp_path}",
    ]
    out = subprocess.run([sys.executable, "-m", "runners.eval", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["task"] == "lm_eval" and r["limit"] == 1 and r["n_samples"]["streamkv_lastword"]["effective"] == 1
    assert {"acc", "perplexity"} <= set(r["lm_eval"]["streamkv_lastword"])
    assert {"acc", "acc_depth_0.5"} <= set(r["lm_eval"]["streamkv_passkey"])
    assert "streamkv_passkey/acc_depth_0.5" in r["metrics"] and r["compression"]["avg_key_bits"] < 32  # the fp32 tail of 96 tokens stays exact
    assert "streamkv_lastword/acc" in out.stdout
