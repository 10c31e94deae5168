"""Sweeps: composition of every sweep file, and real multiruns on a tiny model under each launcher.

The subprocess runs use a tiny random Llama with head_dim 64 (the default value groups of 64 and key
groups of 128 tokens need it), one window of 256 tokens and chunks of 128: a few seconds per job.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from streamkv.lab.reports.sweep import make_report
from streamkv.lab.runs.jobdir import slug

REPO = Path(__file__).resolve().parent.parent
CONF, SWEEPS = REPO / "conf", REPO / "sweeps"


# --- composition (in-process, no model) ----------------------------------------------------------------


def compose_sweep(name: str, overrides: list[str] = ()):
    """Compose sweeps/<name>.yaml as `runners.sweep` does (conf/ plus sweeps/ on the search path)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    import streamkv.lab.schema  # noqa: F401
    from streamkv.lab import registry

    registry.load_builtins()
    search_path = create_config_search_path(str(CONF))
    search_path.prepend("command-line", f"file://{SWEEPS}", anchor=SearchPathQuery(provider="schema"))  # --config-dir
    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name="eval", config_search_path=search_path)
        return hydra.compose_config(name, list(overrides), run_mode=RunMode.MULTIRUN, with_log_configuration=False)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("name", ["ablation", "bits", "chunk", "tune", "pareto", "codebooks"])
def test_every_sweep_composes_as_a_multirun_named_after_itself(name, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # our Optuna sweeper lives in ./hydra_plugins
    import hydra_plugins.streamkv_optuna_sweeper.config  # noqa: F401

    cfg = compose_sweep(name)
    assert cfg.name == name and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params and cfg.hydra.sweep.dir == f"outputs/sweeps/{name}"
    assert cfg.task.max_windows <= 2  # sized for a CPU


def test_ablation_variants_remove_one_ingredient_each():
    variants = compose_sweep("ablation").hydra.sweeper.params.ablation.split(",")
    assert sorted(variants) == sorted(p.stem for p in (CONF / "ablation").glob("*.yaml"))
    get = {v: compose_sweep("ablation", [f"ablation={v}"]) for v in variants}
    full = get["full"]
    assert full.hydra.runtime.choices.sink == "fixed" and full.outlier.ema_decay == 0.9
    assert get["no_sinks"].hydra.runtime.choices.sink == "none"
    assert get["no_outliers"].hydra.runtime.choices.outlier == "none"
    assert get["no_ema"].outlier.ema_decay == 0.0
    assert (get["per_token_keys"].quantizer.key_axis, get["per_token_keys"].quantizer.key_group_size) == ("token", 64)
    assert get["post_rope_keys"].quantizer.pre_rope is False and full.quantizer.pre_rope is True
    assert get["baseline"].hydra.runtime.choices.quantizer == "none"
    assert get["edge_layers"].quantizer.edge_layers == 2 and full.quantizer.edge_layers == 0


def test_the_long_context_sweep_composes_every_method_on_the_same_prompts():
    """One job per conf/method option, each the lm_eval task with the same RULER prompts (only the
    compression differs), named after the sweep."""
    methods = compose_sweep("longctx").hydra.sweeper.params.method.split(",")
    assert set(methods) <= {p.stem for p in (CONF / "method").glob("*.yaml")} and "baseline" in methods
    jobs = {m: compose_sweep("longctx", [f"method={m}"]) for m in methods}
    assert {j.name for j in jobs.values()} == {"longctx"} and {str(j.hydra.mode) for j in jobs.values()} == {"RunMode.MULTIRUN"}
    assert len({repr(j.task) for j in jobs.values()}) == 1
    assert jobs["baseline"].hydra.runtime.choices.quantizer == "none" and jobs["kv3"].quantizer.budget_bits == 3.25
    assert jobs["seed2"].quantizer.key_bits == 2 and jobs["seed2"].hydra.runtime.choices.quantizer == "uniform"


def test_unknown_sweep_is_a_one_line_error(capsys):
    from runners.sweep import main

    with pytest.raises(SystemExit) as e:
        main(["nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "'ablation', 'bits', 'chunk', 'codebooks', 'longctx', 'pareto', 'tune'" in err


def test_job_dir_names_are_one_safe_path_component():
    assert slug("a=1,b=x") == "a=1,b=x"
    assert "/" not in slug("data.path=/tmp/x.txt")
    long = slug("k=" + "v" * 400)
    assert len(long.encode()) <= 200 and long != slug("k=" + "v" * 399 + "w")


# --- real multiruns (subprocesses) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dirs(tiny_llama_dir, tmp_path_factory):
    """(model dir, text file): the fixture's tokenizer with a head_dim-64 model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny64")
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(path)
    text = path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    return path, text


@pytest.fixture
def sweep(tiny_dirs, tmp_path):
    """Run `python -m runners.sweep <name>` on the tiny model into tmp_path/<name>; returns (result, dir)."""
    model, text = tiny_dirs

    def run(name: str, *overrides: str):
        out_dir = tmp_path / name
        cmd = [sys.executable, "-m", "runners.sweep", name, f"model.path={model}", "data=text_file",
               f"data.path={text}", "task.window=256", "task.max_windows=1", "progress=false",
               f"hydra.sweep.dir={out_dir}", *overrides]
        env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300), out_dir

    return run


def job_dirs(sweep_dir: Path) -> dict[str, Path]:
    """{the job's first override: its directory}."""
    return {yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())[0]: d for d in sweep_dir.iterdir()
            if (d / ".hydra").is_dir()}


def test_ablation_runs_reports_and_resumes_only_the_killed_job_under_joblib(sweep):
    variants = ("ablation=no_sinks,baseline", "chunk_size=128")
    out, sweep_dir = sweep("ablation", *variants)
    assert out.returncode == 0, out.stderr[-2000:]
    jobs = job_dirs(sweep_dir)
    assert set(jobs) == {"ablation=no_sinks", "ablation=baseline"}
    results = {k: json.loads((d / "results.json").read_text()) for k, d in jobs.items()}
    components = results["ablation=no_sinks"]["components"]
    assert (components["ablation"], components["sink"], components["quantizer"]) == ("no_sinks", "none", "uniform")

    report = make_report(sweep_dir)
    assert {"markdown", "csv", "pareto"} <= set(report.files)
    by_job = {r["job"]: r for r in report.table}
    assert by_job["ablation=baseline"]["delta_ppl"] == 0 and by_job["ablation=no_sinks"]["delta_ppl"] is not None

    # a job killed midway: no results.json, a stray temp file; the re-run (another launcher) redoes only it
    killed = jobs["ablation=no_sinks"]
    (killed / "results.json").unlink()
    (killed / ".results.json.x.tmp").write_text("{")
    before = {k: (d / "results.json").stat().st_mtime_ns for k, d in jobs.items() if d != killed}
    out, _ = sweep("ablation", *variants, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert job_dirs(sweep_dir) == jobs  # the same directories under another launcher
    assert json.loads((killed / "results.json").read_text())["config"] == results["ablation=no_sinks"]["config"]
    assert {k: (jobs[k] / "results.json").stat().st_mtime_ns for k in before} == before


def test_a_failing_job_does_not_stop_the_others_and_is_reported(sweep):
    out, sweep_dir = sweep("chunk", "chunk_size=64,128")  # 64 < one key group of 128 tokens: fails first
    assert out.returncode == 2 and "error: chunk_size=64" in out.stderr
    jobs = job_dirs(sweep_dir)
    assert (jobs["chunk_size=128"] / "results.json").is_file()
    failed = json.loads((jobs["chunk_size=64"] / "failed.json").read_text())
    assert failed["type"] == "ConfigError" and not (jobs["chunk_size=64"] / "results.json").exists()
    text = make_report(sweep_dir).files["markdown"].read_text()
    assert "(failed): ConfigError: chunk_size=64 is smaller" in text


def test_submitit_local_launcher_runs_the_sweep_unchanged(sweep):
    out, sweep_dir = sweep("chunk", "chunk_size=256", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((job_dirs(sweep_dir)["chunk_size=256"] / "results.json").read_text())
    assert result["chunk_size"] == 256 and result["config"]["name"] == "chunk"


def test_tuner_runs_three_seeded_trials_and_writes_the_best(sweep):
    out, sweep_dir = sweep("tune", "hydra.sweeper.n_trials=3", "chunk_size=128")
    assert out.returncode == 0, out.stderr[-2000:]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["trials"] == 3 and best["completed"] == 3
    assert any(o.startswith("quantizer.key_bits=") for o in best["best_overrides"])
    assert len(list(sweep_dir.glob("*/results.json"))) == 3
