"""The side-by-side benchmark: planning, a tiny end-to-end run through the runner, crash reporting."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from streamkv.kv.errors import ConfigError
from streamkv.lab import registry
from streamkv.lab.bench.plan import BenchConfig, MethodSpec, plan
from streamkv.lab.bench.run import run_bench

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
registry.load_builtins()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n\n") * 8)
    return path


def bench_config(overrides=()) -> BenchConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="bench", overrides=list(overrides)))


def test_plan_runs_the_reference_first_and_filters_widths():
    cfg = bench_config(["run=[kivi,hf_fp8,baseline]", "bits=[4]", "speed_bits=[2]"])
    jobs = plan(cfg)
    assert [(j.method, j.bits) for j in jobs] == [("baseline", 32), ("kivi", 4), ("hf_fp8", 8)]
    assert jobs[1].overrides == ["experiment=kivi", "quantizer.key_bits=4", "quantizer.value_bits=4"]
    assert [j.speed for j in jobs] == [True, False, True]  # single-width methods are always timed
    speed_only = plan(bench_config(["run=[kivi]", "bits=[4]", "measure=[decode]"]))
    assert [(j.method, j.bits) for j in speed_only] == [("kivi", 4)]  # no Δppl, no reference run
    full_cfg = bench_config()
    full = plan(full_cfg)
    assert {j.method for j in full} == set(full_cfg.run) and len(full) == 1 + 3 + 3 + 3 + 2 + 3 + 3 + 2 + 3 + 1 + 4 + 1  # streamkv_post_rope, *_edge: on demand


def test_every_method_composes_at_each_of_its_widths():
    """A typo in a method's overrides fails here, not an hour into a full run."""
    from streamkv.lab.bench.plan import compression_for

    cfg = bench_config(["run=[]"])
    cfg.run = list(cfg.methods)
    jobs = plan(cfg)
    assert {j.method for j in jobs} == set(cfg.methods)
    pre_rope = {}
    for job in jobs:
        compression, _ = compression_for(job.overrides)
        pre_rope[job.method, job.bits] = getattr(compression.quantizer, "pre_rope", None)
    assert [pre_rope["kv", b] for b in (2, 3, 4)] == [True] * 3
    assert [pre_rope["kv_post_rope", b] for b in (2, 3, 4)] == [False] * 3


def test_a_method_can_be_added_on_the_command_line():
    cfg = bench_config(['+methods.mine={overrides:["experiment=kv{bits}","quantizer.pre_rope=false"],bits:[4]}',
                        "run=[mine]"])
    assert [(j.method, j.bits, j.overrides) for j in plan(cfg)] == [
        ("baseline", 32, ["experiment=baseline"]), ("mine", 4, ["experiment=kv4", "quantizer.pre_rope=false"])]
    cfg = bench_config(["+methods.mine={overrides:[kivi],bitz:[4]}", "run=[mine]"])
    with pytest.raises(ConfigError, match=r"^methods\.mine: Key 'bitz' not in 'MethodSpec' \(a method has label"):
        plan(cfg)


def test_tiny_bench_writes_table_csv_and_plot(tiny64_dir, text_file, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "runners.bench", "preset=tiny", f"model.path={tiny64_dir}", "model.name=tiny64",
        "data=text_file", f"data.path={text_file}", "run=[baseline,streamkv,kivi,kvquant,hf_fp8]",
        "max_windows=1", "progress=false", f"hydra.run.dir={out}", "measure=[ppl,prefill,decode,answer]",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "bench.md").read_text()
    for method in ("baseline", "streamkv", "kivi", "kvquant", "hf_fp8", "DynamicCache"):
        assert f"| `{method}` |" in table
    assert "crashed" not in table and "tiny64" in table
    rows = list(csv.DictReader(open(out / "bench.csv")))
    assert [r["method"] for r in rows] == ["baseline", "streamkv", "kivi", "kvquant", "hf_fp8", "DynamicCache"]
    for r in rows[:-1]:
        assert r["status"] == "ok" and float(r["ppl"]) > 1
        assert float(r["prefill_tok_s"]) > 0 and float(r["prefill_ratio"]) > 0
        assert float(r["decode_tok_s"]) > 0 and float(r["decode_ratio"]) > 0
        assert float(r["answer_s"]) > 0 and float(r["answer_ratio"]) > 0
        assert float(r["kv_bytes_prefill"]) > 0
    assert float(rows[0]["delta_ppl_pct"]) == 0
    assert float(rows[0]["kl"]) == 0 and float(rows[0]["top1_agreement"]) == 1  # the reference is itself
    assert all(float(r["kl"]) >= 0 and 0 < float(r["top1_agreement"]) <= 1 for r in rows[1:-1])
    assert float(rows[1]["kl"]) > 0  # streamkv (KIVI keeps this tiny window in its full-precision residual)
    assert "| KL | KL p99 | top-1 |" in table
    by = {r["method"]: r for r in rows}
    assert float(by["streamkv"]["avg_bits"]) < 8 < float(by["baseline"]["avg_bits"])
    assert float(by["streamkv"]["kv_bytes_prefill"]) < float(by["baseline"]["kv_bytes_prefill"]) / 4
    png = out / "bench_pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_crashing_method_is_reported_not_hidden(tiny64_dir, text_file, tmp_path):
    cfg = bench_config(["preset=tiny", f"model.path={tiny64_dir}", "data=text_file", f"data.path={text_file}",
                        "measure=[ppl]", "max_windows=1", "progress=false"])
    cfg.methods["broken"] = MethodSpec(label="a key group longer than a chunk",
                                             overrides=["experiment=kivi", "quantizer.key_group_size=4096"], bits=[4])
    cfg.run = ["baseline", "broken"]
    res = run_bench(cfg, tmp_path)
    broken = res["rows"][1]
    assert broken["status"] == "crashed" and "key_group_size" in broken["error"]
    assert broken["resolved"]["quantizer"]["key_group_size"] == 4096  # each row records what it composed
    assert "crashed: ConfigError" in (tmp_path / "bench.md").read_text()
    assert res["rows"][0]["status"] == "ok"
