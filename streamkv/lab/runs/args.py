"""The runners that are plain argparse commands (no Hydra app) fail the way the Hydra ones do: one ``error:`` line.

Kept free of Hydra: the serving benchmark runs in vLLM's own environment, which does not install it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, NoReturn

from ...kv.errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
    """A bad or missing option raises :class:`ConfigError` instead of printing the usage over several lines."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def run_main(main: Callable[[list[str]], Any]) -> None:
    """Run ``main(sys.argv[1:])`` as the command; a ConfigError it raises is one ``error:`` line, exit status 2."""
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
