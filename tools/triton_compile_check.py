"""Compile the Triton attention kernels for a CUDA target on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``, the CPU tests) checks the kernels' arithmetic but not their
compilation. This drives the backend through ``runners.bench_attention --verify``'s storages at the
Llama-3.1-8B layout on CPU tensors, intercepts each kernel launch, compiles it with ``triton.compile``
for ``--arch`` (default sm_90: H100/H200) and reports shared memory, registers and spills (ptxas -v);
it fails on a compile error or on more shared memory than the target has. Uses Triton internals of
3.x (ASTSource, mangle_type); slow (a few seconds per specialization)::

    python tools/triton_compile_check.py [--arch 90] [--dtypes bfloat16,float32] [--storages int4,int2]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

import streamkv.kv.kernels.triton_attention as kernels  # noqa: E402
import streamkv.lab.bench.attention as bench  # noqa: E402
import streamkv.lab.bench.attention_verify as verify_mod  # noqa: E402
from streamkv.kv.attention import triton as backend  # noqa: E402

SMEM = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # opt-in shared memory per block
SHOWN = ("BM", "BN", "KBITS", "KAXIS", "VBITS", "VAXIS", "KLUT", "QROT", "ROPE", "ROPE_H", "HAS_KO", "HAS_VO", "VSEP", "HAS_MASK", "PREC")


def ptxas(ptx: str, arch: int) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    txt = ""
    for name in ("ptxas", "ptxas-blackwell"):  # the PTX version decides which of Triton's bundled assemblers reads it
        exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if exe.exists():
            out = subprocess.run([str(exe), "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True, text=True)
            txt = out.stdout + out.stderr
            if out.returncode == 0:
                break
    regs = re.findall(r"Used (\d+) registers", txt)
    spills = re.findall(r"(\d+) bytes spill stores", txt)
    return f"registers {','.join(regs) or '?'} spill stores {','.join(spills) or '?'} B"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--storages", default="", help="comma-separated substrings of the verify storages (default: all)")
    a = p.parse_args()
    target = GPUTarget("cuda", a.arch, 32)
    seen: dict = {}
    failures = []

    def compile_launch(kernel, args, kwargs):
        opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        sig = {n: mangle_type(x) for n, x in zip(kernel.arg_names, args)}
        sig.update({n: "constexpr" for n in kwargs})
        key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(map(str, kwargs.items()))), tuple(sorted(opts.items())))
        if key in seen:
            return
        shown = {k: v for k, v in kwargs.items() if k in SHOWN}
        try:
            ck = triton.compile(ASTSource(kernel, {n: sig[n] for n in kernel.arg_names}, constexprs=kwargs), target=target,
                                options=opts)
        except Exception as e:  # noqa: BLE001
            seen[key] = False
            failures.append(f"{kernel.fn.__name__} {shown}: {str(e)[:2000]}")
            print(f"FAIL compile {kernel.fn.__name__} {shown}\n{str(e)[:2000]}", flush=True)
            return
        smem = ck.metadata.shared
        ok = smem <= SMEM.get(a.arch, 227 * 1024)
        seen[key] = ok
        if not ok:
            failures.append(f"{kernel.fn.__name__} {shown}: {smem} B of shared memory")
        print(f"{'ok  ' if ok else 'FAIL'} {kernel.fn.__name__} {shown} warps {opts.get('num_warps')} shared {smem} B "
              f"{ptxas(ck.asm['ptx'], a.arch)}", flush=True)

    class Launcher:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: compile_launch(self.kernel, list(args), dict(kwargs))

    kernels.attend_kernel = Launcher(kernels.attend_kernel)
    kernels.merge_kernel = Launcher(kernels.merge_kernel)
    attend = backend.TritonBackend.attend

    def launches_only(self, view, query, mask, scaling):  # no device to run on: the launches are what is checked
        attend(self, view, query, mask, scaling)
        b, hq, ql, d = query.shape
        return torch.zeros(b, ql, hq, d, dtype=query.dtype)

    backend.TritonBackend.attend = launches_only
    wanted = [s for s in a.storages.split(",") if s]
    verify_mod.VERIFY = {k: v for k, v in verify_mod.VERIFY.items() if not wanted or any(w in k for w in wanted)}
    dtypes = tuple(getattr(torch, d) for d in a.dtypes.split(","))
    verify_mod.verify(bench.Setup(contexts=[], batches=[], q_heads=8, kv_heads=2), torch.device("cpu"), context=300, batch=1,
                 dtypes=dtypes, quiet=True)
    print(f"{len(seen)} specializations compiled for sm_{a.arch}; {len(failures)} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
