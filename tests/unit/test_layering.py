"""The package's import graph: one-way layers, no cycles (docs/design.md#glossary).

The core (layout, lookahead, loss, mtp, models, mtp_model, batch, decoder, errors) imports
nothing of hf/, parallel/, train/, data/ or the CLI; decoding does not import training. The one
exception is each model's ``parallelize.py``, where a model meets ``parallel/``. Only train/
and the CLI import the training config; no module imports another module's private name; the
library never imports ``multitoken.testing``. Checked twice: by what a fresh interpreter
actually loads, and statically over every ``import`` in ``src/``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "multitoken"
CORE = ("multitoken.models", "multitoken.mtp_model", "multitoken.mtp", "multitoken.loss")
UPPER = (
    "multitoken.hf",
    "multitoken.parallel",
    "multitoken.train",
    "multitoken.cli",
    "multitoken.data",
    "multitoken.testing",
)
# Where a model meets parallel/: torchtitan's parallelize.py beside each model.
PARALLELIZE = ("multitoken.models.parallelize", "multitoken.hf.parallelize")


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
    core = [
        m
        for m in graph
        if (m.startswith(CORE) or m in ("multitoken.layout",)) and m not in PARALLELIZE
    ]
    for module in core + ["multitoken.decoding.generate", "multitoken.decoding.state"]:
        upper = sorted(m for m in graph[module] if m.startswith(UPPER))
        assert not upper, f"{module} imports {upper}"


def test_only_train_and_the_cli_import_the_training_config():
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if "multitoken.train.config" in deps)
    assert users, "the walk found no user of the training config"
    outside = [m for m in users if not m.startswith(("multitoken.train", "multitoken.cli"))]
    assert not outside, outside


def test_the_library_never_imports_the_testing_package():
    graph = _graph()
    users = sorted(
        m
        for m, deps in graph.items()
        if not m.startswith("multitoken.testing")
        and any(d.startswith("multitoken.testing") for d in deps)
    )
    assert not users, users


def _private_imports(path: Path) -> list[str]:
    """``from multitoken.x import _name`` in ``path``: a private name taken across modules."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("multitoken"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_no_private_name_is_imported_across_modules():
    found = {
        str(p.relative_to(SRC)): names for p in SRC.rglob("*.py") if (names := _private_imports(p))
    }
    assert not found, found


def test_private_import_finder_finds_one(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from multitoken.loss import _secret, public\n")
    assert _private_imports(path) == ["multitoken.loss._secret"]


def test_no_code_cites_a_design_file_the_project_does_not_hold():
    """The design the code relies on is docs/design.md; a DESIGN.md lives outside the project."""
    root = SRC.parents[1]
    files = [*SRC.rglob("*.py"), *(root / "tests").rglob("*.py"), *(root / "bench").glob("*.py")]
    skip = {"test_docs.py", Path(__file__).name}  # these two name it to refuse it
    citing = [
        str(p.relative_to(root))
        for p in files
        if p.name not in skip and "DESIGN.md" in p.read_text()
    ]
    assert len(files) > 50 and not citing, citing
