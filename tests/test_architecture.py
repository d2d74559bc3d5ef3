"""The package's shape: layers that import downward only, no import cycles, small modules, and a
library that imports without Ray or MLflow (so the GPU check runs where neither is installed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

from .conftest import ROOT

LIBRARY = ["unmix_ray.compose", "unmix_ray.step", "unmix_ray.evaluation", "unmix_ray.checkpoint", "unmix_ray.methods",
           "unmix_ray.losses", "unmix_ray.unmix", "unmix_ray.augment", "unmix_ray.optim", "unmix_ray.models",
           "unmix_ray.collectives", "unmix_ray.data", "unmix_ray.storage", "unmix_ray.concurrency",
           "unmix_ray.redact", "unmix_ray.config"]


def test_import_contracts_hold():
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout


def strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """Tarjan's strongly connected components of the module import graph, those of 2+ modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if not w.startswith("unmix_ray"):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module.startswith("unmix_ray") and module not in index:
            visit(module)
    return out


def test_no_import_cycles():
    assert strongly_connected(grimp.build_graph("unmix_ray")) == []


def test_a_cycle_would_be_found(tmp_path):
    pkg = tmp_path / "unmix_ray_cycle_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from unmix_ray_cycle_probe import b\n")
    (pkg / "b.py").write_text("from unmix_ray_cycle_probe import a\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert strongly_connected(grimp.build_graph("unmix_ray_cycle_probe")) == [
            {"unmix_ray_cycle_probe.a", "unmix_ray_cycle_probe.b"}]
    finally:
        sys.path.remove(str(tmp_path))


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "unmix_ray").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_the_library_imports_without_ray_or_mlflow():
    code = ("import sys; sys.modules.update({m: None for m in ('ray', 'mlflow', 'pyarrow', 'pandas', 'boto3')}); "
            + "; ".join(f"import {m}" for m in LIBRARY))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
