"""How ``tools/fault_catalogue.py`` runs a case: a fresh process of a runner (or the seed API) in the
tests' environment, optionally interrupted, within a time bound."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "tests" / "crash_plugin"  # registers task=crash, a task with a bug


ONE_WINDOW = ["task.window=256", "task.max_windows=1", "chunk_size=128", "progress=false"]


@dataclass
class Case:
    name: str
    argv: list[str]  # after the interpreter: ["-m", "runners.eval", ...] or ["-c", code]
    rc: int = 2
    needle: str = ""  # words the error line must contain
    env: dict = field(default_factory=dict)  # None unsets a variable
    bound: float = 120.0  # seconds; a case running longer hangs
    before: Optional[Callable[[], None]] = None  # prepares what the case runs into
    check: Optional[Callable[[], Optional[str]]] = None  # what is on disk afterwards; a string says what is wrong
    interrupt: Optional[tuple[int, str]] = None  # (signal, glob): sent 1 s after a path matches
    run: Optional[Callable[["Case"], tuple[int, str, float]]] = None  # a custom run (concurrency)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def environment(extra: dict) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    return {k: v for k, v in env.items() if v is not None}


def start(argv: list[str], extra_env: dict, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=environment(extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def launch(argv: list[str], extra_env: dict, interrupt: Optional[tuple[int, str]] = None, bound: float = 300):
    """(exit status, stderr, seconds); a run past ``bound`` is killed and reported as a hang."""
    t0 = time.monotonic()
    p = start(argv, extra_env)
    if interrupt:
        sig, pattern = interrupt
        while not glob.glob(pattern) and time.monotonic() - t0 < bound:
            time.sleep(0.05)
        time.sleep(1)
        p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=max(1.0, bound - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        return 124, err + f"\nhang: killed after {bound:g} s", time.monotonic() - t0
    return p.returncode, err, time.monotonic() - t0
