"""Kernels the attention backends and the storage call: packed-code readers and encoders for the CPU
(numba) and the GPU (Triton). Each is imported only where it runs; :func:`compiled_cpu` says whether the
CPU ones can."""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache


@lru_cache(maxsize=1)
def numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def compiled_cpu() -> bool:
    """Whether the compiled CPU kernels run here: numba is installed and ``STREAMKV_NO_KERNELS=1`` does
    not switch them off (every caller then takes its torch path: the same numbers, slower)."""
    return numba_installed() and os.environ.get("STREAMKV_NO_KERNELS") != "1"
