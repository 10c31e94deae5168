"""The CPU decode kernels' on-disk cache across processes: what one process compiles the next loads,
and layouts compiled in different processes never stand in for each other."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from streamkv.kv.kernels import compiled_cpu

# A process that decodes with the fused backend (its kernels loaded from disk or compiled) and the
# dense one for each quantizer named on its command line, exits non-zero if they differ, and prints
# how many kernel signatures it loaded and compiled.
DECODE = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from streamkv import CompressedCache
from streamkv.kv.attention import DenseBackend, FusedBackend
from streamkv.kv.kernels import cpu_attend
from streamkv.lab.compression import build_compression
Q = {"uniform": {"name": "uniform", "key_group_size": 64, "rotate_keys": True, "rotate_values": True},
     "lloyd_max": {"name": "lloyd_max", "key_group_size": 64, "key_bits": 3, "value_bits": 2}}
torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, num_hidden_layers=1, hidden_size=128, intermediate_size=256,
                     num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa")
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 96, (1, 140))
for name in sys.argv[1:]:
    out = []
    for backend in (DenseBackend(), FusedBackend()):
        cache = CompressedCache.for_model(model, build_compression(Q[name], "none", "none", backend), chunk_size=64)
        with torch.inference_mode():
            model(input_ids=ids[:, :138], cache=cache, use_cache=True)
            out.append(torch.cat([model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in (138, 139)], 1))
    torch.testing.assert_close(out[1], out[0], atol=2e-4, rtol=0)
kernels = cpu_attend._compiled.values()
print(sum(sum(k.stats.cache_hits.values()) for k in kernels), sum(sum(k.stats.cache_misses.values()) for k in kernels))
"""


@pytest.mark.skipif(not compiled_cpu(), reason="numba is not installed")
def test_layouts_compiled_in_two_processes_are_each_loaded_as_themselves(tmp_path):
    """Two processes each compile one layout (the same steps in the same order, so numba numbers their
    functions alike); a third loads both from disk, compiles nothing, and runs each one's own code."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def decode(*names) -> tuple[int, int]:
        done = subprocess.run([sys.executable, "-c", DECODE, *names], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        hits, misses = done.stdout.split()[-2:]
        return int(hits), int(misses)

    assert decode("uniform")[1] > 0
    assert decode("lloyd_max")[1] > 0
    hits, misses = decode("uniform", "lloyd_max")
    assert hits >= 2 and misses == 0
