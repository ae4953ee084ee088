"""The shape the codebase keeps (docs/testing.md): no file in src/ over 400 lines, no function
over 60 lines of code (docstrings, comments and blank lines not counted)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "multitoken"
MAX_FILE_LINES = 400
MAX_FUNCTION_CODE_LINES = 60


def _code_lines(source: str, node: ast.AST) -> int:
    """Lines of ``node`` holding code: not blank, not only a comment, not its docstring."""
    lines = set(range(node.lineno, node.end_lineno + 1))
    body = getattr(node, "body", [])
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str):
        lines -= set(range(first.lineno, first.end_lineno + 1))  # the docstring
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                            tokenize.DEDENT, tokenize.ENDMARKER):  # fmt: skip
            code.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines & code)


def long_functions(source: str, limit: int = MAX_FUNCTION_CODE_LINES) -> list[tuple[str, int]]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            count = _code_lines(source, node)
            if count > limit:
                found.append((node.name, count))
    return found


def test_no_file_in_src_is_over_400_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert len(sizes) > 20
    assert not {k: v for k, v in sizes.items() if v > MAX_FILE_LINES}


def test_no_function_in_src_is_over_60_lines_of_code():
    found = {}
    for path in SRC.rglob("*.py"):
        if long := long_functions(path.read_text()):
            found[str(path.relative_to(SRC))] = long
    assert not found, found


def test_the_counter_counts_code_only():
    body = "\n".join(f"    x{i} = {i}  # note" for i in range(61))
    source = f'def f():\n    """Doc.\n\n    More."""\n    # a comment\n\n{body}\n'
    assert long_functions(source) == [("f", 62)]  # the def line and 61 assignments
    shorter = source.replace("    x60 = 60  # note\n", "").replace(
        "    x59 = 59  # note", "    # x"
    )
    assert long_functions(shorter) == []  # the def line and 59 assignments
