"""Where the lab's configs live: ``conf/`` and ``sweeps/`` at the root of the checkout (the package is
installed in editable mode, as ``install.sh`` does), beside the ``runners/`` that compose them."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"
SWEEPS_DIR = REPO / "sweeps"
