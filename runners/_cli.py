"""What every runner shares: one-line errors for user mistakes.

Hydra prints composition errors over several lines and task exceptions with a traceback. Its
``run_and_report`` is wrapped so that a bad override, an unknown option or a :class:`ConfigError`
prints one ``error: ...`` line and exits with status 2; bugs keep their traceback (and
``HYDRA_FULL_ERROR=1`` restores Hydra's own reporting for everything).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra._internal.utils as _hydra_utils
from hydra.errors import CompactHydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from streamkv import jobdir
from streamkv.kv.errors import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
SWEEPS_DIR = str(Path(__file__).resolve().parent.parent / "sweeps")


def one_line(e: BaseException) -> str:
    """A user-facing one-line description of a configuration error."""
    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return f"{group}={option} is not an option of '{group}'; choose one of {sorted(e.options)}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    cause = e.__cause__
    if cause is not None and isinstance(cause, OmegaConfBaseException):
        lines += [ln.strip() for ln in str(cause).splitlines() if ln.strip()][:1]
    keep = [ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type=", "To append"))]
    return " ".join(keep[:3]) or type(e).__name__


def fail(e: BaseException) -> None:
    """Print ``e`` as one ``error:`` line and exit with status 2."""
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)


def _run_and_report(func):
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return _original(func)
    try:
        return func()
    except (ConfigError, CompactHydraException, OmegaConfBaseException) as e:
        fail(e)
    except Exception:  # a bug: keep Hydra's (trimmed) traceback
        return _original(lambda: (_ for _ in ()).throw(sys.exc_info()[1]))


_original = _hydra_utils.run_and_report
_hydra_utils.run_and_report = _run_and_report
jobdir.register_resolver()  # ${job_dir:...} in hydra.sweep.subdir (imported here, so launchers' workers have it too)
