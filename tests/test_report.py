"""Sweep reports from job directories on disk: table, CSV, plots, failed and killed jobs, W&B fallback."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from runners import report as report_runner
from streamkv.lab.reports import wandb as wandb_report
from streamkv.lab.reports.sweep import make_report, pareto_front
from streamkv.lab.runs.args import run_main


def fake_job(root: Path, variant: str, ppl: float | None = None, bits: float = 4.6, quantizer: str = "uniform",
             failed: str | None = None, window: int = 256) -> Path:
    """A job directory as a sweep leaves it: Hydra's overrides, then results.json or failed.json (or neither)."""
    d = root / f"ablation={variant},task.window=256"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- ablation={variant}\n- task.window=256\n")
    if failed:
        (d / "failed.json").write_text(json.dumps({"error": failed, "type": "ConfigError"}))
    elif ppl is not None:
        results = {
            "components": {"quantizer": quantizer, "sink": "fixed", "outlier": "ema_relative", "ablation": variant},
            "chunk_size": 512,
            "metrics": {"ppl": ppl, "nll": 1.0, "tokens": 255, "windows": 1},
            "speed": {"seconds": 1.0, "prefill_tokens_per_s": 1000.0},
            "compression": {"avg_bits": bits, "compression_ratio": 16 / bits},
            "config": {"name": "ablation", "quantizer": {"key_bits": 4, "value_bits": 4}, "task": {"window": window},
                       "logger": {"project": "p"}},
        }
        (d / "results.json").write_text(json.dumps(results))
    return d


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "ablation"
    fake_job(root, "baseline", 10.0, bits=16.0, quantizer="none")
    fake_job(root, "full", 10.5)
    fake_job(root, "no_sinks", 11.5, bits=4.4)
    fake_job(root, "no_ema", 10.4, bits=4.7)
    fake_job(root, "per_token_keys", failed="quantizer.key_group_size=64 does not divide head_dim=16")
    killed = fake_job(root, "post_rope_keys")
    (killed / ".results.json.abc.tmp").write_text("{")  # killed while writing: never a results.json
    return root


def test_report_table_csv_and_plots(sweep_dir):
    rep = make_report(sweep_dir)
    assert {"markdown", "csv", "pareto", "ablation"} <= set(rep.files)
    for name in ("pareto", "ablation"):
        assert rep.files[name].read_bytes()[:4] == b"\x89PNG"
    md = rep.files["markdown"].read_text()
    assert "6 jobs: 4 ok, 1 failed, 1 incomplete" in md and "Δppl is against `ablation=baseline`" in md
    assert "| ablation=no_sinks | uniform | fixed | ema_relative | 4 | 4 | 4.4 | 11.5 | +1.5 | +15 |" in md
    assert "- `ablation=per_token_keys` (failed): ConfigError: quantizer.key_group_size=64" in md
    assert "- `ablation=post_rope_keys` (incomplete)" in md
    rows = list(csv.DictReader(rep.files["csv"].open()))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"ok", "failed", "incomplete"}


def test_a_newer_failure_wins_over_older_results(sweep_dir):
    job = sweep_dir / "ablation=no_ema,task.window=256"
    (job / "failed.json").write_text(json.dumps({"error": "boom", "type": "RuntimeError"}))
    row = next(r for r in make_report(sweep_dir).table if r["job"] == "ablation=no_ema")
    assert row["status"] == "failed" and row["error"] == "RuntimeError: boom"


def test_explicit_baseline_and_no_baseline(tmp_path):
    root = tmp_path / "bits"
    fake_job(root, "a", 12.0)
    fake_job(root, "b", 13.0)
    assert all(r.get("delta_ppl") is None for r in make_report(root).table)
    base = fake_job(tmp_path / "elsewhere", "baseline", 10.0, quantizer="none")
    table = make_report(root, baseline=base / "results.json").table
    assert sorted(r["delta_ppl"] for r in table) == [2.0, 3.0]
    other = fake_job(tmp_path / "other", "baseline", 10.0, quantizer="none", window=512)  # another protocol
    assert all(r.get("delta_ppl") is None for r in make_report(root, baseline=other).table)


def test_pareto_front_keeps_points_no_other_beats():
    assert pareto_front([(4.0, 10.0), (3.0, 12.0), (4.5, 11.0), (2.0, 30.0)]) == [(2.0, 30.0), (3.0, 12.0), (4.0, 10.0)]


def test_runner_without_wandb_credentials_says_so_and_writes_the_local_report(sweep_dir, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(sweep_dir / "no-netrc"))
    report_runner.main([str(sweep_dir), "--wandb"])
    out = capsys.readouterr().out
    assert "# Sweep report: ablation" in out and "no W&B credentials" in out
    assert (sweep_dir / "report" / "report.md").is_file()


@pytest.mark.parametrize("argv", [["NOPE"], []], ids=["missing-dir", "no-dir-given"])
def test_runner_on_a_missing_dir_is_a_one_line_error(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["report", *[str(tmp_path / "nope") for _ in argv]])
    with pytest.raises(SystemExit) as e:
        run_main(report_runner.main)  # as ``python -m runners.report`` runs it
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert ("is not a directory" if argv else "required: sweep_dir (see python -m runners.report --help)") in err[0]
    assert not (tmp_path / "nope").exists()


def test_wandb_report_is_built_over_the_sweep_group():
    rep = wandb_report.build("ablation", "streamkv", None, "| table |")
    assert rep.title.endswith("ablation")
    grid = next(b for b in rep.blocks if hasattr(b, "runsets"))
    assert "Group" in str(grid.runsets[0].filters) and "ablation" in str(grid.runsets[0].filters)
