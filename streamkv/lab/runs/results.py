"""Run results on disk: written atomically, with the versions and revision that produced them.

``failed.json`` says why a job ended without results: ``reason`` is ``config`` (a bad input, fixable
from its one-line ``error``), ``interrupted`` (a signal: a re-run completes the job) or ``error``
(anything else, with its ``traceback``).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import traceback
from pathlib import Path
from typing import Any

from ...kv.errors import ConfigError
from .signals import Interrupted, signal_of

RESULTS = "results.json"
FAILED = "failed.json"

_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give: mkstemp's files are 0600


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file and a rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as JSON in ``path``, atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def failure(e: BaseException) -> dict:
    """The content of ``failed.json`` for ``e``."""
    if isinstance(e, KeyboardInterrupt):
        line = str(Interrupted(signal_of(e)))
        return {"error": f"{line}; a re-run completes this job", "type": "Interrupted", "reason": "interrupted"}
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, ConfigError):
        return {"error": line, "type": type(e).__name__, "reason": "config"}
    tb = "".join(traceback.format_exception(e))
    return {"error": line, "type": type(e).__name__, "reason": "error", "traceback": tb}


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def git_revision(cwd: str | os.PathLike | None = None) -> str | None:
    cwd = cwd or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    import torch
    import transformers

    from ... import __version__

    return {"torch": torch.__version__, "transformers": transformers.__version__, "streamkv": __version__}
