"""The engine's shape: layers that import only downward, no cycles, small modules.

DESIGN.md's rule, checked two ways: `lint-imports` (the `.importlinter` layers contract,
which `.ci/run` also runs) and a cycle search over every import in `engine/`, the ones
made inside functions included. Only the heavy optional packages may be imported inside a
function; everything else is imported at the top of its module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"
MAX_LINES = 400
DEFERRABLE = ("optuna", "onnxruntime", "ray", "transformers")  # heavy, optional at run time


def _modules() -> list[Path]:
    return sorted(ENGINE.rglob("*.py"))


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if not w.startswith("engine"):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(m for m in graph.modules if m.startswith("engine")):
        if module not in index:
            visit(module)
    return found


def test_the_engine_has_no_import_cycle_counting_imports_inside_functions():
    graph = grimp.build_graph("engine")  # grimp reads every import statement, nested too
    assert len([m for m in graph.modules if m.startswith("engine.")]) > 40
    assert _cycles(graph) == []


def test_the_layers_contract_holds():
    out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command;"
                          "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def test_no_engine_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_imports_sit_at_the_top_except_the_heavy_optional_packages():
    """An import inside a function hides a dependency from the reader (and from the layers
    contract's reader's eye); only optuna, onnxruntime, ray and transformers may wait there,
    plus the package's own lazy `engine.run` (engine/__init__.py's `__getattr__`)."""
    nested = []
    for path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for top in tree.body:
            if isinstance(top, (ast.Import, ast.ImportFrom)):
                continue
            for node in ast.walk(top):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                else:
                    continue
                if isinstance(top, ast.If) and _is_type_checking(top.test):
                    continue
                if isinstance(top, ast.Try):  # an optional package's guarded import
                    continue
                bad = [n for n in names if n.split(".")[0] not in DEFERRABLE]
                if bad:
                    nested.append(f"{path.relative_to(ROOT)}:{node.lineno} {', '.join(bad)}")
    assert nested == []


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def test_engine_never_imports_streamlit():
    graph = grimp.build_graph("engine", include_external_packages=True)
    users = graph.find_modules_that_directly_import("streamlit") if "streamlit" in \
        graph.modules else set()
    assert users == set()
