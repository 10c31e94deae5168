"""SIGINT and SIGTERM as an exception: a job that is stopped can still say so in its failed.json.

The runners turn both signals into :class:`Interrupted` (:mod:`streamkv.lab.runs.cli`), and exit with
128 + the signal's number, as a shell reports a process the signal killed.
"""

import signal


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived. A ``KeyboardInterrupt``, so ``except Exception`` never swallows it."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")


def signal_of(e: BaseException) -> int:
    """The signal behind an interrupt: a plain ``KeyboardInterrupt`` (Ctrl-C in a library's loop) is SIGINT."""
    return getattr(e, "signum", signal.SIGINT)
