"""User-facing errors.

A :class:`ConfigError` is a mistake the user can fix (a bad value, a missing file). Runners print it as
one line and exit non-zero without a traceback (every other failure too: see :mod:`streamkv.lab.runs.cli`).
"""


class ConfigError(ValueError):
    """A bad user input: the message names the value and what is allowed."""


def check(ok: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def one_of(name: str, value, allowed) -> None:
    """Fail unless ``value`` is in ``allowed``, naming both."""
    allowed = list(allowed)
    check(value in allowed, f"{name}={value!r} is not allowed; choose one of {allowed}")
