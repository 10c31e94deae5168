"""What every runner shares: every failure ends as one ``error:`` line, never a traceback.

Hydra prints composition errors over several lines and task exceptions with a traceback. Two public
seams replace that (lightning-hydra-template's ``task_wrapper`` pattern, no Hydra internal patched):
:func:`task_wrapper` around the task function turns what stops a job into one line, and :func:`launch`
runs the Hydra app with ``HYDRA_FULL_ERROR=1`` (Hydra's documented switch: raise instead of printing)
and turns whatever escapes (composition errors, the first failed job of a sweep) into one line:

- 2: a bad input (an override, an option, a key, a value: :class:`ConfigError` and Hydra's own), or
  an output directory that cannot be written (named by its ``hydra.run.dir`` / ``hydra.sweep.dir``);
- 1: anything else (an OS error, a bug); its traceback is in the job's ``failed.json``;
- 130 / 143: SIGINT / SIGTERM, raised as :class:`Interrupted` so the job marks itself interrupted.

``HYDRA_FULL_ERROR=1`` set by the user restores Hydra's own reporting, tracebacks included.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from contextlib import contextmanager
from typing import Any, Callable, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ...kv.errors import ConfigError
from ..schema import unknown_key, valid_keys
from . import jobdir, rundir
from .signals import Interrupted, signal_of

USAGE = (ConfigError, CompactHydraException, OmegaConfBaseException)


def one_line(e: BaseException) -> str:
    """A user-facing one-line description of whatever stopped the run."""
    if isinstance(e, KeyboardInterrupt):
        return f"{Interrupted(signal_of(e))}; re-run the same command to complete it (a sweep skips its finished jobs)"
    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return f"{group}={option} is not an option of '{group}'; choose one of {sorted(e.options)}"
    if not isinstance(e, USAGE):
        os_error = _os_error(e)
        key = _output_dir_key(os_error)
        if key:
            return f"{key} cannot be written ({_what(os_error)}); choose a writable directory"
        what = _what(os_error) if os_error is not None else f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        where = getattr(e, "failed_json", None)
        return f"{what} ({f'the traceback is in {where}' if where else 'HYDRA_FULL_ERROR=1 shows the traceback'})"
    cause = e.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and valid_keys(cause.object_type):
        return unknown_key(cause.full_key, cause.object_type)  # an unknown key of a typed node
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if isinstance(cause, OmegaConfBaseException):
        lines += [ln.strip() for ln in str(cause).splitlines() if ln.strip()][:1]
    keep = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type=", "To append"))]
    return " ".join(keep[:3]) or type(e).__name__


def exit_code(e: BaseException) -> int:
    if isinstance(e, KeyboardInterrupt):
        return 128 + signal_of(e)
    if isinstance(e, USAGE) or _output_dir_key(_os_error(e)):
        return 2
    return 1


def fail(e: BaseException) -> NoReturn:
    """Print ``e`` as one ``error:`` line and exit with its status (see the module docstring)."""
    print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(exit_code(e))


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (logging wraps a log file it cannot open in a ValueError)."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return e


def _output_dir_key(e: OSError | None) -> str | None:
    """``hydra.run.dir=...`` / ``hydra.sweep.dir=...`` when ``e`` is about the output directory, an
    ancestor of it or a file in it."""
    if e is None or e.filename is None or rundir.planned is None:
        return None
    key, path = rundir.planned
    failed = os.path.abspath(os.fsdecode(e.filename))
    return f"{key}={path}" if os.path.commonpath([path, failed]) in (path, failed) else None


def _what(e: OSError) -> str:
    return f"{e.strerror or e}: {os.fsdecode(e.filename)}" if e.filename is not None else f"{type(e).__name__}: {e}"


class _Signals:
    """SIGINT and SIGTERM raise :class:`Interrupted` while a runner works, so the job can mark itself;
    outside that (between Hydra's steps, at exit) and on a second signal they print the one line and
    exit at once: a traceback from an atexit hook helps no one."""

    def __init__(self) -> None:
        self.armed = False
        self.raised = False

    def install(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.handle)

    def handle(self, signum, frame) -> None:
        if self.armed and not self.raised:
            self.raised = True
            raise Interrupted(signum)
        e = Interrupted(signum)
        sys.stdout.flush()
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        os._exit(exit_code(e))

    @contextmanager
    def armed_while(self):
        self.install()
        before, self.armed = self.armed, True
        try:
            yield
        finally:
            self.armed = before


_signals = _Signals()


def task_wrapper(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """The Hydra task function, with every failure one line: a single run exits with it at once; in a
    multirun the failure goes back to Hydra, which records the job as failed and runs the others."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            with _signals.armed_while():
                return task(cfg)
        except (Exception, KeyboardInterrupt) as e:
            if _user_full_error() or (HydraConfig.get().mode == RunMode.MULTIRUN and not isinstance(e, KeyboardInterrupt)):
                raise
            fail(e)

    return wrapped


def launch(app: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` app so that whatever escapes it is one ``error:`` line (see the module docstring)."""
    if _user_full_error():
        app()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its report; we print one line
    try:
        with _signals.armed_while():
            app()
    except (Exception, KeyboardInterrupt) as e:
        fail(e)


_USER_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"  # read before launch() sets it


def _user_full_error() -> bool:
    return _USER_FULL_ERROR


jobdir.register_resolver()  # ${job_dir:...} in hydra.sweep.subdir (imported by every runner, so launchers' workers have it too)
rundir.register_resolver()  # ${run_tag:} in hydra.run.dir
