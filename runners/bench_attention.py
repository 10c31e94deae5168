"""Kernel benchmark of the compressed read path: ``python -m runners.bench_attention [--smoke] [--out DIR]``.

Decode attention over a compressed history (triton, fused, dense read) against SDPA on the same
history in bf16, Llama-3.1-8B layout, contexts 8k/32k/128k x batch 1/4/16; see
:mod:`streamkv.lab.bench.attention`. ``--verify`` checks the triton backend against the reference
read instead (:mod:`streamkv.lab.bench.attention_verify`). Needs no Hydra; a bad option is one
``error:`` line, exit 2.

Examples::

    python -m runners.bench_attention                                  # the full table (CUDA GPU)
    python -m runners.bench_attention --contexts 32768 --batches 1,16 --backends sdpa,triton
    TRITON_INTERPRET=1 python -m runners.bench_attention --smoke        # tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from streamkv.kv.errors import ConfigError, check
from streamkv.lab.bench.attention import BACKENDS, Setup, run
from streamkv.lab.bench.attention_verify import verify
from streamkv.lab.runs.args import ArgumentParser, run_main


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers") from None


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(prog="python -m runners.bench_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=_ints, default=[8192, 32768, 131072])
    p.add_argument("--batches", type=_ints, default=[1, 4, 16])
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", type=Path, default=None, help="directory for bench_attention.md/.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, CPU-friendly (for tests)")
    p.add_argument("--verify", action="store_true", help="check the triton backend against the reference read instead")
    a = p.parse_args(argv)
    device, backends = _checked(a)
    if a.smoke:
        setup = Setup(contexts=[256], batches=[1, 2], q_heads=4, kv_heads=2, dim=64, key_group=64, value_group=32,
                      backends=backends, warmup=1, repeats=2, chunk=128, copy_mib=8)
    else:
        setup = Setup(contexts=a.contexts, batches=a.batches, backends=backends, warmup=a.warmup, repeats=a.repeats)
    if a.verify:
        rows = verify(setup, device, context=200 if a.smoke else 1000, batch=1 if a.smoke else 2)
        bad = [r for r in rows if not r["ok"]]
        print(f"verify: {len(rows) - len(bad)}/{len(rows)} within tolerance", flush=True)
        if a.out is not None:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / "verify.json").write_text(json.dumps(rows, indent=1))
        if bad:
            raise SystemExit(1)
        return {"verify": rows}
    return run(setup, device, a.out)


def _checked(a: argparse.Namespace) -> tuple[torch.device, tuple[str, ...]]:
    """The device and backends asked for, after checking every option (a bad one is a ConfigError)."""
    backends = tuple(b for b in a.backends.split(",") if b)
    check(bool(backends) and set(backends) <= set(BACKENDS), f"--backends {a.backends!r}: choose from {list(BACKENDS)}")
    for name in ("contexts", "batches"):
        values = getattr(a, name)
        shown = ",".join(map(str, values))
        check(bool(values) and min(values) >= 1, f"--{name} {shown!r}: positive integers, comma-separated")
    check(a.warmup >= 0, f"--warmup {a.warmup}: calls before timing, at least 0")
    check(a.repeats >= 1, f"--repeats {a.repeats}: timed calls, at least 1")
    try:
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"--device {a.device!r} is not a torch device; use cpu or cuda[:N]") from None
    no_gpu = device.type == "cuda" and not torch.cuda.is_available()
    check(not no_gpu, f"--device {a.device}: no CUDA GPU here; use --device cpu")
    return device, backends


if __name__ == "__main__":
    run_main(main)
