"""The eval runner end to end: results.json, summaries, and one-line errors for bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_eval(*overrides, cwd=REPO, flags=()):
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run(
        [sys.executable, *flags, "-m", "runners.eval", *overrides], cwd=cwd, capture_output=True, text=True, env=env,
        timeout=600,
    )


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return p


def tiny(tiny_llama_dir, text_file, run_dir, *extra):
    return run_eval(
        f"model.path={tiny_llama_dir}", "data=text_file", f"data.path={text_file}", "task.window=64", "task.max_windows=2",
        "chunk_size=32", "quantizer.key_group_size=16", "quantizer.value_group_size=16", f"hydra.run.dir={run_dir}", *extra,
    )


def test_tiny_run_writes_results(tiny_llama_dir, text_file, tmp_path):
    out = tiny(tiny_llama_dir, text_file, tmp_path / "run")
    assert out.returncode == 0, out.stderr
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["task"] == "perplexity" and r["metrics"]["tokens"] == 2 * 63 and r["metrics"]["windows"] == 2
    assert r["components"]["quantizer"] == "uniform" and r["compression"]["kv_bytes"] > 0
    assert {"torch", "transformers", "streamkv"} <= set(r["versions"]) and "git" in r
    assert r["config"]["chunk_size"] == 32 and r["speed"]["prefill_tokens_per_s"] > 0
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    assert "ppl" in out.stdout and "results:" in out.stdout


def _not_causal(tmp_path):
    from transformers import T5Config

    d = tmp_path / "t5"
    T5Config(d_model=8, num_layers=1, num_heads=1, d_ff=8, d_kv=8, vocab_size=32).save_pretrained(d)
    return d


BAD = [
    (["model=nope"], "model=nope"),
    (["nope=1"], "nope"),
    (["chunk_size=0"], "chunk_size=0"),
    (["chunk_size=-3"], "chunk_size=-3"),
    (["task.window=1"], "task.window=1"),
    (["task.max_windows=0"], "task.max_windows=0"),
    (["data.path=/no/such/file.txt"], "/no/such/file.txt"),
    (["EMPTY"], "empty"),
    (["task.window=100000", "model.max_positions=200000"], "shorter than one window"),
    (["task.window=5000"], "task.window=5000 exceeds the model's 1024 positions"),
    (["sink.size=64"], "sink.size=64 is not smaller than the longest sequence (64 tokens)"),
    (["+nonsense_key=1"], "unknown key 'nonsense_key'; valid keys at the top level: ['name', 'chunk_size'"),
    (["quantizer.nope=1"], "unknown key 'quantizer.nope'; valid keys at quantizer (UniformQuantizer): ['key_bits'"),
    (["BINARY"], "is a binary file"),
    (["LATIN1"], "is not UTF-8 text (byte 0xe9 at offset 3)"),
    (["CORRUPT"], "cannot load model from"),
    (["NOTCAUSAL"], "not a causal language model"),
    (["model.path=/tmp"], "not a loadable model"),
    (["quantizer.key_bits=5"], "key_bits=5"),
    (["outlier.ema_decay=1.5"], "ema_decay=1.5"),
]


@pytest.mark.parametrize("overrides,needle", BAD, ids=[b[0][0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(overrides, needle, tiny_llama_dir, text_file, tmp_path):
    if overrides == ["EMPTY"]:
        (tmp_path / "empty.txt").write_text("\n\n")
        overrides = [f"data.path={tmp_path / 'empty.txt'}"]
        needle = f"data.path={tmp_path / 'empty.txt'}: the text is empty"
    if overrides == ["BINARY"]:
        (tmp_path / "x.bin").write_bytes(bytes(range(256)) * 8)
        overrides = [f"data.path={tmp_path / 'x.bin'}"]
    if overrides == ["LATIN1"]:
        (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 100)
        overrides = [f"data.path={tmp_path / 'latin1.txt'}"]
    if overrides == ["CORRUPT"]:
        shutil.copytree(tiny_llama_dir, tmp_path / "corrupt")
        (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x10" * 100)
        overrides = [f"model.path={tmp_path / 'corrupt'}"]
    if overrides == ["NOTCAUSAL"]:
        overrides = [f"model.path={_not_causal(tmp_path)}"]
    run_dir = tmp_path / "run"
    out = tiny(tiny_llama_dir, text_file, run_dir, *overrides)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert needle in lines[0]
    assert "Traceback" not in out.stderr
    assert not (run_dir / "results.json").exists()


def test_a_config_error_is_found_before_the_model_libraries_load(tmp_path):
    """Checking a config needs no model code: transformers' cache (and hqq, which it imports) loads with a cache."""
    out = run_eval("quantizer.key_bits=5", f"hydra.run.dir={tmp_path}", flags=("-X", "importtime"))
    assert out.returncode == 2 and "error: quantizer.key_bits=5" in out.stderr, out.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in out.stderr.splitlines() if ln.startswith("import time:")}
    assert "streamkv.lab.runs.job" in imported
    assert not imported & {"transformers.cache_utils", "hqq", "streamkv.kv.cache"}


@pytest.mark.integration
def test_embedded_model_two_short_windows(tmp_path, embedded):
    """Uncompressed: the streaming protocol equals one full forward; compressed: close to it."""
    common = ["task.window=256", "task.max_windows=2", "chunk_size=128"]
    ppl = {}
    for name, extra in {
        "stream": ["quantizer=none"],
        "full": ["quantizer=none", "task.mode=full"],
        "seed": [],
    }.items():
        out = run_eval(*common, *extra, f"hydra.run.dir={tmp_path / name}")
        assert out.returncode == 0, out.stderr
        ppl[name] = json.loads((tmp_path / name / "results.json").read_text())["metrics"]["ppl"]
    assert ppl["stream"] == pytest.approx(ppl["full"], rel=1e-4)
    assert ppl["seed"] != ppl["stream"]
    assert ppl["seed"] == pytest.approx(ppl["stream"], rel=0.05)
