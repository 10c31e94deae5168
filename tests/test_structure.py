"""The engine is importable by a serving stack: an allow-list of what it imports, no lab module, no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "streamkv" / "kv"
ALLOWED = {"torch", "numpy", "transformers", "numba", "triton"}  # numba and triton are optional (imported guarded)


def _module(path: Path) -> str:
    return ".".join(("streamkv", *path.relative_to(ENGINE.parent).with_suffix("").parts)).removesuffix(".__init__")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module or module.name, line) of every import in ``path``, function-level ones too
    (relative ones resolved inside the package)."""
    package = ["streamkv", *path.relative_to(ENGINE.parent).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return out


def test_the_engine_imports_only_the_standard_library_torch_numpy_transformers_and_its_kernels():
    bad = []
    for path in sorted(ENGINE.rglob("*.py")):
        for mod, line in _imports(path):
            top = mod.split(".")[0]
            if top == "streamkv":
                if not mod.startswith("streamkv.kv"):
                    bad.append(f"{path.relative_to(ENGINE.parent)}:{line} imports {mod} (the lab)")
            elif top not in ALLOWED and top not in sys.stdlib_module_names and top != "__future__":
                bad.append(f"{path.relative_to(ENGINE.parent)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_importing_the_engine_loads_no_lab_module_and_no_hydra():
    code = (
        "import sys, streamkv, streamkv.kv, streamkv.kv.attention, streamkv.kv.attention.cpu\n"
        "from streamkv import CompressedCache\n"
        "lab = [m for m in sys.modules if m.split('.')[0] in ('hydra', 'omegaconf', 'runners') or m.startswith('streamkv.lab')]\n"
        "assert not lab, lab\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_engine_has_no_import_cycle():
    """No two engine modules import each other, directly or around a circle (function-level imports
    count too): each concept has one owner, and the read path runs one way, down to the kernels."""
    files = {_module(p): p for p in ENGINE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for me, path in files.items():
        deps = set()
        for mod, _ in _imports(path):
            while mod and mod not in files:
                mod = mod.rpartition(".")[0]
            if mod and mod != me and not me.startswith(mod + "."):  # a package's own __init__ is not a dependency
                deps.add(mod)
        graph[me] = deps
    cycles = []

    def visit(node, stack):
        for nxt in graph[node]:
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in done:
                done.add(nxt)
                visit(nxt, stack + [nxt])

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            done.add(start)
            visit(start, [start])
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_every_stored_block_meets_the_contract():
    """Each storage class answers everything a layer and a reader ask (the StoredBlock protocol)."""
    import torch

    from streamkv.kv.contracts import StoredBlock
    from streamkv.kv.storage.codebook import quantize_codebook, quantize_lloyd_max, quantize_minmax
    from streamkv.kv.storage.composite import split_rows
    from streamkv.kv.storage.fp8 import quantize_fp8
    from streamkv.kv.storage.packed import quantize
    from streamkv.kv.storage.raw import Raw
    from streamkv.kv.storage.turboquant import quantize_unit_norm

    x = torch.randn(4, 32, 16)
    blocks = [quantize(x, 4, "channel", 16), quantize_codebook(x, 3, "token", 16), quantize_lloyd_max(x, 2, "token", 16),
              quantize_minmax(x, 3, "channel", 16), Raw(x.half()), quantize_fp8(x), quantize_unit_norm(x, 3),
              split_rows([2, 4, 2, 4], lambda rows, b: quantize(x if rows is None else x[rows], b, "token", 16), 16),
              quantize(x[:, :16], 2, "token", 16).append(quantize(x[:, 16:], 4, "token", 16))]
    assert {type(b).__name__ for b in blocks} >= {"Quantized", "CodebookQuantized", "Rotated", "Raw", "Fp8", "RowSplit", "Segments"}
    for block in blocks:
        inner = getattr(block, "inner", block)
        assert isinstance(inner, StoredBlock), type(inner).__name__
        assert inner.tokens == 32 and inner.dim == 16 and inner.nbytes == sum(t.nbytes for t in inner.tensors())
        assert block.dequantize(torch.float32).shape == x.shape


def test_integrations_import_the_engine_and_their_stack_only():
    """An adapter for a serving stack (``streamkv.integrations``) imports the engine, never the lab."""
    root = ENGINE.parent / "integrations"
    bad = [f"{p.relative_to(ENGINE.parent)}:{line} imports {mod}"
           for p in sorted(root.rglob("*.py")) for mod, line in _imports(p)
           if mod.startswith(("streamkv.lab", "hydra", "omegaconf", "runners"))]
    assert list(root.rglob("*.py")) and not bad, "\n".join(bad)
