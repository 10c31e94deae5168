"""The serving benchmark's bookkeeping (no vLLM here): repeated runs in ABC CBA order, the fastest kept,
the table, and its bad input."""

from __future__ import annotations

import json
import sys

import pytest

from runners import serve_bench
from streamkv.lab.runs.args import run_main
from streamkv.lab.serving import run as serving

SECONDS = {("bf16", 0): 50.0, ("k4v4", 0): 40.0, ("bf16", 1): 45.0, ("k4v4", 1): 44.0}


def fake_child(calls: list):
    def child(part, opts, timeout):
        c = opts["config"]
        r = sum(1 for x in calls if x == c)
        calls.append(c)
        s = SECONDS[(c, r)]
        return {"config": c, "kv_mib": opts["kv_mib"], "blocks": 91, "fits": c != "bf16", "seconds": s,
                "requests_per_s": 16 / s, "output_tokens_per_s": 16 * 256 / s, "preemptions": 2}
    return child


def opts(tmp_path, repeats: int) -> dict:
    return {"skip": "quality,free", "configs": "bf16,k4v4", "serve_configs": "bf16,k4v4", "repeats": repeats,
            "serve_kv_mib": 256, "free_kv_mib": 1024, "timeout": 60, "requests": 16, "prompt": 1536, "output": 256,
            "serve_chunk": 1024}


def test_repeated_runs_alternate_their_order_and_keep_the_fastest(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(serving, "child", fake_child(calls))
    text = serving.run(opts(tmp_path, 2), tmp_path, "python -m runners.serve_bench --repeats 2")
    assert calls == ["bf16", "k4v4", "k4v4", "bf16"]
    res = json.loads((tmp_path / "results.json").read_text())["serve"]["capacity-bound"]
    assert res["bf16"]["seconds"] == 45.0 and res["bf16"]["seconds_each"] == [50.0, 45.0]
    assert res["k4v4"]["seconds"] == 40.0 and res["k4v4"]["seconds_each"] == [40.0, 44.0]
    assert "the fastest of 2 runs each" in text
    assert "| k4v4 | 256 | 91 | yes | 0.400 | 102.4 | 2 | 40.0 (40.0 / 44.0) | 1.12x | — |" in text


def test_a_failed_run_is_reported_not_hidden_by_a_faster_one():
    ok = {"seconds": 10.0}
    assert serving.best([ok, {"error": "serve k4v4: exit 1: boom"}]) == {"error": "serve k4v4: exit 1: boom"}
    assert serving.best([{"seconds": 12.0}, ok]) == {"seconds": 10.0, "seconds_each": [12.0, 10.0]}


def test_repeats_below_one_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    text = tmp_path / "test.txt"
    text.write_text("x")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    argv = ["--text", str(text), "--model", str(tmp_path / "model"), "--repeats", "0"]
    monkeypatch.setattr(sys, "argv", ["serve_bench", *argv])
    with pytest.raises(SystemExit) as e:
        run_main(serve_bench.main)  # as ``python -m runners.serve_bench`` runs it
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --repeats 0: runs of each serving configuration, at least 1"]


def test_an_interrupted_run_keeps_what_it_finished(tmp_path, monkeypatch):
    calls: list = []
    finish = fake_child(calls)

    def child(part, opts, timeout):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return finish(part, opts, timeout)

    monkeypatch.setattr(serving, "child", child)
    try:
        serving.run(opts(tmp_path, 2), tmp_path, "python -m runners.serve_bench --repeats 2")
    except KeyboardInterrupt:
        pass
    res = json.loads((tmp_path / "results.json").read_text())["serve"]["capacity-bound"]
    assert set(res) == {"bf16", "k4v4"} and res["k4v4"]["seconds_each"] == [40.0]
    assert "| bf16 | 256 | 91 | no |" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))
