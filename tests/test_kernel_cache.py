"""The CPU decode kernels' on-disk cache across processes: what one process compiles the next loads,
and layouts compiled in different processes never stand in for each other."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from streamkv.kv.kernels import compiled_cpu

# A process that checks the fused backend (its kernels loaded from disk or compiled) against the dense one
# for each quantizer named on its command line (test_attention's check, on the tiny64 model), and prints
# how many kernel signatures it loaded and compiled, and whether their symbol names are all distinct.
DECODE = """
import sys, torch
from conftest import _random_llama
from test_attention import backends_agree
from streamkv.kv.kernels import cpu_attend
Q = {b: {"name": "uniform", "key_group_size": 64, "rotate_keys": True, "rotate_values": True, "key_bits": int(b),
         "value_bits": int(b)} for b in ("4", "8", "2")}
model = _random_llama(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
ids = torch.randint(0, 96, (1, 140), generator=torch.Generator().manual_seed(0))
for name in sys.argv[1:]:
    backends_agree(model, Q[name], "none", "none", ids, chunk=64, decode=2)
kernels = cpu_attend._compiled.values()
names = [k.overloads[sig].fndesc.mangled_name for k in kernels for sig in k.signatures]
print(sum(sum(k.stats.cache_hits.values()) for k in kernels), sum(sum(k.stats.cache_misses.values()) for k in kernels),
      len(set(names)) == len(names))
"""


@pytest.mark.skipif(not compiled_cpu(), reason="numba is not installed")
def test_layouts_compiled_in_two_processes_are_each_loaded_as_themselves(tmp_path):
    """Two processes each compile one layout (the same steps in the same order, so numba numbers their
    functions alike); a third loads both from disk, compiles nothing, runs each one's own code and
    finds their symbol names distinct."""
    path = os.pathsep.join(filter(None, (os.path.dirname(__file__), os.environ.get("PYTHONPATH"))))  # its helpers
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": path}

    def decode(*runs: tuple[str, ...]) -> list[tuple[int, int, bool]]:
        """One process per run, side by side; each one's (hits, misses, distinct names)."""
        procs = [subprocess.Popen([sys.executable, "-c", DECODE, *names], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for names in runs]
        out = []
        for p in procs:
            stdout, stderr = p.communicate()
            assert p.returncode == 0, stderr[-3000:]
            hits, misses, distinct = stdout.split()[-3:]
            out.append((int(hits), int(misses), distinct == "True"))
        return out

    assert decode(("4",))[0][1] > 0  # compiles (and saves) what every layout shares
    # these two load that and compile only their own kernel, after the same steps: numba numbers their
    # functions alike, so without the layout in their names they would share them
    assert all(misses > 0 for _, misses, _ in decode(("8",), ("2",)))
    [(hits, misses, distinct)] = decode(("8", "2"))
    assert hits >= 2 and misses == 0
    # whether one layout's code can stand in for the other's hangs on LLVM's inlining; distinct names
    # rule it out whatever it inlines
    assert distinct
