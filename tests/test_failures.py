"""Nothing lost, nothing hangs: one test per row of the README's "Failure behaviour" table.

Bad values, files and models are rows of ``test_runner.py::test_bad_input_is_one_line_and_writes_nothing``.
Here: concurrent runs, occupied and unwritable directories, signals, failing sweep jobs, bugs, the
network, and the seed API. Subprocess runs use the tiny head_dim-64 Llama, windows of 256 tokens.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamkv.kv.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "crash_plugin"  # registers task=crash, a task with a bug
CRASH = [f"hydra.searchpath=[file://{PLUGIN / 'conf'}]"]


@pytest.fixture
def text(tmp_path):
    """About 500 windows of 256 one-character tokens: seconds for the tiny model, time to interrupt it."""
    p = tmp_path / "text.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 3000)
    return p


def env(**extra) -> dict:
    base = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def args(model, text, *overrides) -> list[str]:
    """The tiny run's overrides; ``overrides`` replace those of the same key."""
    base = [f"model.path={model}", "data=text_file", f"data.path={text}", "task.window=256", "task.max_windows=1",
            "chunk_size=128", "progress=false"]
    given = {o.split("=", 1)[0] for o in overrides}
    return [o for o in base if o.split("=", 1)[0] not in given] + list(overrides)


def start(module: str, *argv: str, cwd=REPO, **env_extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *argv], cwd=cwd, env=env(**env_extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(module: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    p = start(module, *argv, **kw)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def error_line(stderr: str) -> str:
    """The one error line a failure ends with (and no traceback anywhere)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr and lines and lines[-1].startswith("error: "), stderr[-3000:]
    assert sum(ln.startswith("error: ") for ln in lines) == 1, stderr[-3000:]
    return lines[-1]


def wait_for(path: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def job_dir(sweep_dir: Path, override: str, seconds: float = 120) -> Path:
    """The directory of the sweep job with ``override`` (names are shortened: read .hydra/overrides.yaml)."""
    deadline = time.monotonic() + seconds
    while True:
        for f in sweep_dir.glob("*/.hydra/overrides.yaml"):
            if f"- {override}\n" in f.read_text():
                return f.parent.parent
        assert time.monotonic() < deadline, f"no job with {override} in {sweep_dir}"
        time.sleep(0.05)


# --- run directories -------------------------------------------------------------------------------


def test_two_runs_at_once_get_two_run_dirs_and_readable_results(tiny64_dir, text, tmp_path):
    procs = [start("runners.eval", *args(tiny64_dir, text), cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    results = sorted(tmp_path.glob("outputs/runs/*/*/results.json"))
    assert len(results) == 2 and results[0].parent != results[1].parent
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(r.stat().st_mode) for r in results} == {0o666 & ~umask}


def test_a_directory_in_use_is_refused(tiny64_dir, text, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lock", "w") as held:  # another run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        out = run("runners.eval", *args(tiny64_dir, text, f"hydra.run.dir={run_dir}"))
    assert out.returncode == 2 and "is in use by another run" in error_line(out.stderr)
    assert not (run_dir / "results.json").exists() and not (run_dir / "failed.json").exists()


def test_another_configs_results_are_never_overwritten(tiny64_dir, text, tmp_path):
    run_dir = tmp_path / "run"
    assert run("runners.eval", *args(tiny64_dir, text, f"hydra.run.dir={run_dir}")).returncode == 0
    before = (run_dir / "results.json").read_bytes()
    for extra in ([], ["force=true"]):
        out = run("runners.eval", *args(tiny64_dir, text, f"hydra.run.dir={run_dir}", "chunk_size=256", *extra))
        assert out.returncode == 2 and "already holds results.json of another config" in error_line(out.stderr)
    assert (run_dir / "results.json").read_bytes() == before and not (run_dir / "failed.json").exists()
    again = run("runners.eval", *args(tiny64_dir, text, f"hydra.run.dir={run_dir}"))
    assert again.returncode == 0 and "skipped" in again.stdout


@pytest.mark.parametrize("module,key", [("runners.eval", "hydra.run.dir"), ("runners.sweep", "hydra.sweep.dir")])
def test_an_unwritable_output_dir_is_one_line(module, key, tiny64_dir, text, tmp_path):
    (tmp_path / "file.txt").write_text("a file, so no directory can be made under it, even by root")
    target = tmp_path / "file.txt" / "sub"
    argv = (["chunk"] if module == "runners.sweep" else []) + args(tiny64_dir, text, f"{key}={target}")
    out = run(module, *argv)
    assert out.returncode == 2, out.stderr[-2000:]
    assert error_line(out.stderr).startswith(f"error: {key}={target} cannot be written (Not a directory")
    assert (tmp_path / "file.txt").is_file() and not target.exists()


# --- signals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_exits_with_the_signal_and_marks_itself(sig, code, tiny64_dir, text, tmp_path):
    run_dir = tmp_path / "run"
    p = start("runners.eval", *args(tiny64_dir, text, f"hydra.run.dir={run_dir}", "task.max_windows=null"))
    wait_for(run_dir / ".lock")
    time.sleep(1)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code and error_line(err).startswith(f"error: interrupted by {sig.name}")
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["reason"] == "interrupted" and not (run_dir / "results.json").exists()


# the rerun does not depend on the signal that stopped the sweep: it runs once (a minute of CI on a slow machine)
@pytest.mark.parametrize("sig,code,rerun", [(signal.SIGINT, 130, False), (signal.SIGTERM, 143, True)],
                         ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_sweep_keeps_finished_jobs_and_a_rerun_completes_it(sig, code, rerun, tiny64_dir, text,
                                                                           tmp_path):
    sweep_dir = tmp_path / "sweep"
    argv = ["chunk", *args(tiny64_dir, text, f"hydra.sweep.dir={sweep_dir}", "task.max_windows=1,null,2")]  # a long second job
    p = start("runners.sweep", *argv)
    second = job_dir(sweep_dir, "task.max_windows=null")
    wait_for(second / ".lock")
    time.sleep(1)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code and error_line(err).startswith(f"error: interrupted by {sig.name}")
    first = job_dir(sweep_dir, "task.max_windows=1")
    assert (first / "results.json").is_file()
    assert json.loads((second / "failed.json").read_text())["reason"] == "interrupted"
    assert len(list(sweep_dir.glob("*/.hydra"))) == 2  # the sweep stopped: the third job never started
    kept = (first / "results.json").stat().st_mtime_ns
    if not rerun:
        return
    again = run("runners.sweep", *argv)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all((job_dir(sweep_dir, f"task.max_windows={n}") / "results.json").is_file() for n in (1, "null", 2))
    assert not (second / "failed.json").exists() and (first / "results.json").stat().st_mtime_ns == kept


# --- failing jobs and bugs -------------------------------------------------------------------------


def test_a_bug_is_one_line_with_the_traceback_in_failed_json(tiny64_dir, text, tmp_path):
    run_dir = tmp_path / "run"
    out = run("runners.eval", *args(tiny64_dir, text, f"hydra.run.dir={run_dir}", "task=crash", *CRASH),
              PYTHONPATH=f"{REPO}{os.pathsep}{PLUGIN}")
    assert out.returncode == 1
    assert error_line(out.stderr) == (
        f"error: RuntimeError: boom: a bug in the task (the traceback is in {run_dir / 'failed.json'})")
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["reason"] == "error" and 'raise RuntimeError("boom' in failed["traceback"]


def test_a_sweep_job_failing_with_a_bug_does_not_stop_the_others(tiny64_dir, text, tmp_path):
    sweep_dir = tmp_path / "sweep"
    out = run("runners.sweep", "chunk", *args(tiny64_dir, text, f"hydra.sweep.dir={sweep_dir}", "task=crash,perplexity",
                                               *CRASH), PYTHONPATH=f"{REPO}{os.pathsep}{PLUGIN}")
    assert out.returncode == 1 and "RuntimeError: boom" in error_line(out.stderr)
    crashed, ok = job_dir(sweep_dir, "task=crash"), job_dir(sweep_dir, "task=perplexity")
    assert json.loads((crashed / "failed.json").read_text())["reason"] == "error"
    assert (ok / "results.json").is_file()


# --- network -------------------------------------------------------------------------------------------


def online_env(proxy: str) -> dict:
    """No offline flag, every request through ``proxy``."""
    return dict(HF_HUB_OFFLINE=None, HF_DATASETS_OFFLINE=None, TRANSFORMERS_OFFLINE=None, WANDB_MODE=None,
                HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy, http_proxy=proxy, NO_PROXY=None, no_proxy=None)


HUB_AND_WANDB = '''
import json, sys, time
from streamkv.lab.data.text import WikiText2
from streamkv.kv.errors import ConfigError
from streamkv.lab.loggers.wandb import WandbLogger
from streamkv.lab.models.causal_lm import CausalLM

out = {}
for name, call in [("model", lambda: CausalLM(path="someorg/somemodel").positions()), ("data", lambda: WikiText2().load())]:
    t = time.monotonic()
    try:
        call()
        out[name] = "no error"
    except ConfigError as e:
        out[name] = str(e)
    out[name + "_s"] = time.monotonic() - t
logger = WandbLogger()
t = time.monotonic()
logger.start(config={}, run_dir=sys.argv[1], name="x", group=None, job_type="t", tags=[])
out["wandb_s"] = time.monotonic() - t
out["wandb_mode"] = logger._run.settings.mode if logger._run else None
logger.finish()
print(json.dumps(out))
'''


def test_a_hub_and_wandb_that_never_answer_are_given_up_within_the_bound(dead_proxy, tmp_path):
    out = subprocess.run([sys.executable, "-c", HUB_AND_WANDB, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env=env(**online_env(dead_proxy.url), WANDB_API_KEY="x" * 40))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert dead_proxy.accepted >= 2  # the requests really went to the dead proxy
    assert r["model_s"] < 15 and "model.path=someorg/somemodel is not a loadable model (offline: " in r["model"]
    assert r["data_s"] < 15 and "cannot load wikitext/wikitext-2-raw-v1 from the hub (offline: " in r["data"]
    assert r["wandb_s"] < 15 + 10 and r["wandb_mode"] == "offline"  # the probe, then wandb's own offline start


def test_a_local_run_makes_no_network_request(dead_proxy, tiny64_dir, text, tmp_path):
    out = run("runners.eval", *args(tiny64_dir, text, f"hydra.run.dir={tmp_path / 'run'}"),
              **online_env(dead_proxy.url), PYTHONPROFILEIMPORTTIME="1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert dead_proxy.accepted == 0
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in out.stderr.splitlines() if ln.startswith("import time:")}
    if importlib.util.find_spec("kernels") is not None:  # transformers >= 5.25 routes model functions through
        assert "kernels" in imported  # hub kernels: the run loaded it, and it asked the network nothing


# --- the seed API --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(key_bits_normal=5), "key_bits_normal=5 is not allowed; choose one of [2, 3, 4, 8]"),
    (dict(key_bits_sink_outlier=4), "key_bits_sink_outlier=4 is not allowed; choose one of [8, 16]"),
    (dict(attention_sink_size=-1), "attention_sink_size=-1 must be >= 0"),
    (dict(ema_decay=1.0), "ema_decay=1.0 must be in [0, 1)"),
    (dict(quantizer_options={"nope": 1}), "unknown key 'quantizer.nope'; valid keys at quantizer (UniformQuantizer)"),
])
def test_compression_config_names_the_seeds_fields(kwargs, message):
    from streamkv import CompressionConfig

    with pytest.raises(ConfigError) as e:
        CompressionConfig(**kwargs)
    assert str(e.value).startswith(message)


def test_generate_refuses_empty_and_over_long_prompts(tiny_llama_dir, one_thread):
    from streamkv import CompressedLlamaForCausalLM, CompressionConfig

    config = CompressionConfig(chunk_size=32, quantizer_options=dict(key_group_size=16, value_group_size=16))
    model = CompressedLlamaForCausalLM.from_pretrained(tiny_llama_dir, compression_config=config)
    with pytest.raises(ConfigError, match="the prompt is empty"):
        model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ConfigError, match="the prompt has 1025 tokens: 1025 > the model's 1024 positions"):
        model.generate(torch.ones(1, 1025, dtype=torch.long), max_new_tokens=None)
    with pytest.raises(ConfigError, match="the prompt has 1000 tokens and max_new_tokens=30: 1030 > the model's 1024"):
        model.generate(input_ids=torch.ones(1, 1000, dtype=torch.long), max_new_tokens=30)
    assert model.generate(input_ids=torch.ones(1, 8, dtype=torch.long), max_new_tokens=2, do_sample=False).shape == (1, 10)
