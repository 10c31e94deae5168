"""A run's directory: a name no other run picks, and one run at a time inside it.

Two runs started in the same second used to share ``<date>/<time>_eval`` and the later one overwrote
the first's results. A run directory is now named with microseconds and a random tag
(``${run_tag:}`` in ``hydra.run.dir``), and :func:`claim` holds an exclusive ``flock`` on
``<dir>/.lock`` while a job decides whether it may write there and until it has written: a second
process in the same directory fails at once instead of mixing files. The kernel drops the lock when
the holder dies, so a killed run never leaves the directory blocked. Sweep job directories keep their
stable names (a re-run finds its finished jobs); the lock and the config check protect them.
"""

from __future__ import annotations

import fcntl
import functools
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ...kv.errors import ConfigError

LOCK = ".lock"
planned: tuple[str, str] | None = None  # (setting, directory) of the current run or sweep, for error messages


@functools.cache
def run_tag() -> str:
    """Four random hex digits, the same for the whole process."""
    return secrets.token_hex(2)


@contextmanager
def claim(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``run_dir`` for this process; a :class:`ConfigError` if another process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise ConfigError(
                f"{run_dir} is in use by another run{f' (pid {holder})' if holder else ''}; wait for it to finish, "
                "or choose another directory (hydra.run.dir=... / hydra.sweep.dir=...)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield run_dir
    finally:
        os.close(fd)  # releases the lock


class OutputDir(Callback):
    """Remembers where Hydra will write (``hydra.callbacks`` in conf/eval.yaml), so an OS error about
    that directory can name its setting (Hydra's callbacks cannot stop a run, only observe it)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _plan("hydra.run.dir", config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _plan("hydra.sweep.dir", config)


def _plan(key: str, config: DictConfig) -> None:
    global planned
    planned = (key, os.path.abspath(str(OmegaConf.select(config, key))))


def register_resolver() -> None:
    OmegaConf.register_new_resolver("run_tag", run_tag, replace=True)
