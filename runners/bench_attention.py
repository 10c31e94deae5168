"""Kernel benchmark of the compressed read path: ``python -m runners.bench_attention [--smoke] [--out DIR]``.

Decode attention over a compressed history (triton, fused, dense read) against SDPA on the same
history in bf16, Llama-3.1-8B layout, contexts 8k/32k/128k x batch 1/4/16; see
:mod:`streamkv.bench_attention`. Needs no Hydra.

Examples::

    python -m runners.bench_attention                                  # the full table (CUDA GPU)
    python -m runners.bench_attention --contexts 32768 --batches 1,16 --backends sdpa,triton
    TRITON_INTERPRET=1 python -m runners.bench_attention --smoke        # tiny shapes on the CPU
"""

import sys

from streamkv.bench_attention import main

if __name__ == "__main__":
    main(sys.argv[1:])
