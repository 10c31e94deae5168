"""The serving benchmark: streamkv's vLLM plugin against stock vLLM, measured through vLLM itself.

Runs in the vLLM venv (``tools/vllm_env.sh``: no Hydra there), so it takes argparse options
(``runners/serve_bench.py``). ``engine`` starts an in-process engine per configuration; ``measure``
holds the two measurements (quality on the README protocol, a serving run under a KV budget), each run
in its own subprocess because vLLM picks its attention backend once per process; ``report`` renders
the side-by-side tables.
"""
