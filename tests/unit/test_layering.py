"""The package's import graph: one-way layers, no cycles (STYLE.md, "The house").

The core (layout, lookahead, loss, mtp, models, model, batch, decoder, errors) imports nothing
of parallel/, train/ or the CLI; decoding does not import training. Checked twice: by what a
fresh interpreter actually loads, and statically over every ``import`` in ``src/``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "multitoken"
CORE = ("multitoken.models", "multitoken.mtp_model", "multitoken.mtp", "multitoken.loss")
UPPER = ("multitoken.parallel", "multitoken.train", "multitoken.cli", "multitoken.data")


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if 'multitoken' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", [*CORE, "multitoken", "multitoken.decoding.generate"])
def test_core_and_decoding_load_no_upper_layer(module):
    loaded = _loaded_after_import(module)
    assert module in loaded
    upper = sorted(m for m in loaded if m.startswith(UPPER))
    assert not upper, f"importing {module} loads {upper}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every multitoken module ``path`` imports (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] == "multitoken"}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # "from multitoken.parallel import x" depends on the package's __init__.
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_src():
    graph = _graph()
    assert len(graph) > 20  # the walk found the package
    # A package's __init__ re-exports its submodules; edges from a submodule to its own
    # package's __init__ would be cycles in any package that re-exports, so none may exist.
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_modules_import_no_upper_layer_statically():
    graph = _graph()
    core = [m for m in graph if m.startswith(CORE) or m in ("multitoken.layout",)]
    for module in core + ["multitoken.decoding.generate", "multitoken.decoding.state"]:
        upper = sorted(m for m in graph[module] if m.startswith(UPPER))
        assert not upper, f"{module} imports {upper}"
