"""Run a named sweep from ``sweeps/``: ``python -m runners.sweep <name> [overrides]``.

A sweep is a primary config in ``sweeps/`` that composes ``eval`` (``defaults: [eval, _self_]``), sets
``name``, ``hydra.mode: MULTIRUN`` and ``hydra.sweeper.params``. This runner only checks the name and
starts the eval app as ``--config-dir sweeps --config-name <name>``, so a sweep is exactly an eval
multirun: overrides, launchers (``hydra/launcher=joblib``) and skipping of finished jobs all apply.
"""

from __future__ import annotations

import sys
from pathlib import Path

from streamkv.lab.paths import SWEEPS_DIR


def available() -> list[str]:
    return sorted(p.stem for p in Path(SWEEPS_DIR).glob("*.yaml"))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: python -m runners.sweep <sweep> [overrides]; sweeps: {', '.join(available())}")
        sys.exit(0 if args else 2)
    name, overrides = args[0], args[1:]
    if name not in available():
        print(f"error: no sweep named {name!r} in {SWEEPS_DIR}; choose one of {available()}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], "--config-dir", str(SWEEPS_DIR), "--config-name", name, *overrides]
    from streamkv.lab.runs.cli import launch

    from .eval import main as eval_main

    launch(eval_main)


if __name__ == "__main__":
    main()
