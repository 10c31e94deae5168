"""Fixtures for the vLLM plugin tests: the embedded model, and engine probes run in subprocesses.

Each probe is a fresh process (vLLM picks and caches its attention backend once per process); the
plugin enters it through streamkv's ``vllm.general_plugins`` entry point (pyproject.toml), or where
streamkv is not installed in this venv, the same entry point declared by a throw-away dist-info on
``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__import__("os").environ.get("PROBE_OVERRIDE") or Path(__file__).with_name("engine_probe.py"))
ENTRY_POINT = "streamkv = streamkv.integrations.vllm:register"


def model_dir() -> Path:
    return Path(os.environ.get("STREAMKV_CACHE", Path.home() / ".cache" / "streamkv")) / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    path = model_dir()
    if not (path / "config.json").is_file():
        why = f"the embedded model is not converted at {path} (python -m streamkv.lab.models.embedded)"
        if os.environ.get("CI"):  # .ci/run converts it first: a skip there would hide every engine test
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory) -> Path | None:
    """None where streamkv's entry point is installed (tools/vllm_env.sh), else a directory holding a
    dist-info that declares it."""
    from importlib.metadata import entry_points

    if any(e.value == ENTRY_POINT.split(" = ")[1] for e in entry_points(group="vllm.general_plugins")):
        return None
    root = tmp_path_factory.mktemp("entry_point")
    info = root / "streamkv_vllm_probe-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: streamkv-vllm-probe\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{ENTRY_POINT}\n")
    return root


def run_probe(options: dict, preset: str | None, plugin_path: Path, timeout: int = 900):
    """``(returncode, parsed JSON or None, stderr)`` of one engine run with ``STREAMKV_VLLM=preset``. The
    timeout only catches a hung engine: the first probe of a fresh checkout also compiles the plugin's
    kernels, which took over 300 s in CI on a slow machine beside the main suite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMKV_VLLM")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [plugin_path and str(plugin_path), env.get("PYTHONPATH")]))
    if preset is not None:
        env["STREAMKV_VLLM"] = preset
    r = subprocess.run([sys.executable, str(PROBE), json.dumps(options)], capture_output=True, text=True,
                       env=env, timeout=timeout, check=False)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    return r.returncode, (json.loads(lines[-1]) if lines else None), r.stderr


@pytest.fixture(scope="session")
def raw_probe(plugin_path):
    """``raw_probe(options, preset)``: ``(returncode, report or None, stderr)``, nothing asserted."""
    return lambda options, preset: run_probe(options, preset, plugin_path)


@pytest.fixture(scope="session")
def probe(embedded_model, plugin_path):
    """``probe(preset, **options)``: one engine run's report; the same run is shared by the tests."""
    done: dict = {}

    def run(preset: str | None, **options):
        key = (preset, json.dumps(options, sort_keys=True))
        if key not in done:
            rc, report, err = run_probe({"model": str(embedded_model), **options}, preset, plugin_path)
            assert rc == 0 and report is not None, err[-3000:]
            done[key] = report
        return done[key]

    return run
