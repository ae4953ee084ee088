"""The Python examples of README.md and docs/*.md run.

Every fenced ``python`` block is executed in a fresh namespace, in a temporary working
directory, the blocks of one file in order (they share nothing). A block is skipped when it is
marked illustrative: its fence reads ```` ```python illustrative ````, or the line before the
fence is ``<!-- illustrative -->``. Blocks in any other language (bash, toml, text) are never
run. Illustrative blocks are those that need a GPU, several ranks, a network, a real corpus or
more than a few seconds (docs/testing.md states the convention).

The links between the pages are checked too: a relative link names a file the project holds,
and a ``design.md#anchor`` names a heading of docs/design.md (code cites those anchors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(`{3,})(.*)$")
ILLUSTRATIVE_COMMENT = "<!-- illustrative -->"


@dataclass
class Block:
    """One fenced code block of a Markdown page."""

    page: str
    line: int  # 1-based line of the opening fence
    language: str
    illustrative: bool
    source: str


def code_blocks(text: str, page: str = "<text>") -> list[Block]:
    """Every fenced block of ``text``, in order, with its language and illustrative mark."""
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        ticks, info = opening.group(1), opening.group(2).split()
        body_start = index + 1
        end = body_start
        while end < len(lines) and not lines[end].startswith(ticks):
            end += 1
        before = (line.strip() for line in reversed(lines[:index]))
        previous = next((line for line in before if line), "")
        blocks.append(
            Block(
                page=page,
                line=index + 1,
                language=info[0].lower() if info else "",
                illustrative="illustrative" in info[1:] or previous == ILLUSTRATIVE_COMMENT,
                source="\n".join(lines[body_start:end]) + "\n",
            )
        )
        index = end + 1
    return blocks


def runnable_blocks(text: str, page: str = "<text>") -> list[Block]:
    """The blocks the docs test runs: ``python``, not marked illustrative."""
    return [b for b in code_blocks(text, page) if b.language == "python" and not b.illustrative]


def run_block(block: Block) -> None:
    """Execute one block in a fresh namespace; a failure names the page and the line."""
    code = compile(block.source, f"{block.page}:{block.line}", "exec")
    namespace = {"__name__": f"docs_example_{block.line}"}
    try:
        exec(code, namespace)
    except Exception as error:
        raise AssertionError(
            f"the python block at {block.page}:{block.line} failed: {error!r}"
        ) from error


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", PAGES, ids=_page_id)
def test_python_examples_run(path: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for block in runnable_blocks(path.read_text(), _page_id(path)):
        run_block(block)


def test_the_pages_have_examples_to_run() -> None:
    """The runnable examples are there (a parser that found none would pass vacuously)."""
    counts = {_page_id(p): len(runnable_blocks(p.read_text(), _page_id(p))) for p in PAGES}
    assert counts["README.md"] >= 4, counts
    assert counts["docs/design.md"] >= 3, counts


def test_illustrative_marks_and_a_failing_block() -> None:
    text = "\n".join(
        [
            "```python",
            "x = 1",
            "```",
            "```python illustrative",
            "raise RuntimeError('not run')",
            "```",
            "<!-- illustrative -->",
            "",
            "```python",
            "raise RuntimeError('not run either')",
            "```",
            "```bash",
            "exit 1",
            "```",
            "````python",
            "s = '```'",
            "assert 1 == 2, 'a broken example'",
            "````",
        ]
    )
    blocks = code_blocks(text)
    assert [(b.language, b.illustrative) for b in blocks] == [
        ("python", False),
        ("python", True),
        ("python", True),
        ("bash", False),
        ("python", False),
    ]
    first, broken = runnable_blocks(text)
    run_block(first)
    with pytest.raises(AssertionError, match=r"<text>:15 failed: .*a broken example"):
        run_block(broken)


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", path.read_text(), flags=re.MULTILINE)
    return {_anchor(h) for h in headings}


@pytest.mark.parametrize("path", PAGES, ids=_page_id)
def test_links_name_files_and_headings_that_exist(path: Path) -> None:
    text = path.read_text()
    assert "/work/" not in text and "DESIGN.md" not in text, "cite only files the project holds"
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{_page_id(path)} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{_page_id(path)}: no heading for {target}"
