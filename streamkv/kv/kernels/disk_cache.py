"""Compiled specialisations kept on disk, so a new process loads them instead of compiling again.

The CPU kernels are closures built per layout (widths, codebooks, transforms are compile-time
constants). numba's own ``cache=True`` keys a closure by pickling what it closes over; these close over
other jitted closures, whose pickles carry a random per-process id, so every process missed and
compiled each layout again. Here the key is what decides the compiled code: the caller's ``key`` (the
layout) and a digest of the kernel's source files (numba's own stamp covers only the file of the
outermost function, not the helpers it inlines from other files). numba keeps the rest of its checks
(its version, the CPU, the Python version, the signature).

Code loaded from disk is linked by symbol name, and numba names a function by its qualified name
and a per-process counter: closures built per layout share the qualified name, so two layouts
compiled in two processes could load under one name, and one would run the other's code. Every
closure of a specialisation therefore carries its layout in its name (:func:`tagged`).
"""

from __future__ import annotations

import hashlib
import logging
from functools import lru_cache
from pathlib import Path

from numba.core.caching import FunctionCache

log = logging.getLogger(__name__)


@lru_cache(maxsize=None)
def _digest(paths: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


class _KeyedCache(FunctionCache):
    def __init__(self, py_func, key: tuple, sources: tuple[str, ...]):
        self._key, self._sources = key, sources
        super().__init__(py_func)

    def _index_key(self, sig, codegen):
        return (sig, codegen.magic_tuple(), (repr(self._key), _digest(self._sources)))


def tagged(layout: tuple, *dispatchers) -> None:
    """Append ``layout`` (ints and bools) to the name of each of ``dispatchers`` (``njit`` closures not yet
    compiled): ``kernel`` of layout ``(4, True, 0)`` becomes ``kernel_4_1_0``."""
    tag = "_".join(str(int(x)) for x in layout)
    for d in dispatchers:
        d.py_func.__qualname__ = f"{d.py_func.__qualname__}_{tag}"


def on_disk(dispatcher, key: tuple, sources: tuple[str, ...]):
    """``dispatcher`` (an ``njit`` of a closure, not yet compiled) with its compiled code saved to and
    loaded from numba's cache directory under ``key``; ``sources`` are the files whose code it inlines.
    Where no cache directory is writable it stays as it was (compiled per process)."""
    try:
        dispatcher._cache = _KeyedCache(dispatcher.py_func, key, sources)
    except RuntimeError as e:  # numba found no writable cache location
        log.debug("streamkv: compiled kernels not cached on disk: %s", e)
    return dispatcher
