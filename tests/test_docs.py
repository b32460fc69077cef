"""The docs run: every fenced ```python block of README.md and docs/*.md.

The rule (the same for every page):

* the ```python blocks of one page run in order, in one shared namespace
  (``__name__ == "__main__"``, so a complete program runs as a script), in a
  fresh temporary working directory, with ``BUTTRESS_REDIS_URL`` set to the
  test Redis (a block connects with
  ``redis.Redis.from_url(os.environ["BUTTRESS_REDIS_URL"])``);
* a block that cannot run alone (a sketch, a fragment of a larger program) is
  fenced ```python fragment and is skipped; other languages (```sh, ```text)
  are not run;
* a block cleans up what it starts: threads still running a few seconds after
  the page has run fail it;
* a ```text block introduced by a line that says just ``prints`` is the output
  of the Python block before it, and must match what that block printed.

One test per page, so a page whose blocks fail fails its own test id; the
failure names the block and its line, and tracebacks point into the Markdown
file itself.

A small runner of our own rather than sybil or pytest-examples: the rule above
(one namespace per page, fragments skipped, Redis in the environment, a thread
check) is some sixty lines here, while sybil would need its own markup for the
skips and pytest-examples runs each block alone and is built around linting
and print-output assertions.  No dependency, and the rule reads in one place.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")


@dataclass
class Block:
    line: int  # 1-based line of the first line of code in the page
    info: str  # the fence's info string, e.g. "python" or "python fragment"
    code: str
    before: str = ""  # the last non-blank line of text before the fence

    @property
    def runs(self) -> bool:
        return self.info.split() == ["python"]


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page (CommonMark fences, indented ones too)."""
    found: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        before = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
        body: list[str] = []
        index += 1
        start = index + 1
        while index < len(lines):
            closing = FENCE.match(lines[index])
            if (closing is not None and closing["fence"].startswith(fence)
                    and not closing["info"].strip()):
                break
            line = lines[index]
            body.append(line[min(indent, len(line) - len(line.lstrip())):])
            index += 1
        found.append(Block(start, opening["info"].strip(), "\n".join(body) + "\n", before))
        index += 1
    return found


def test_the_block_parser() -> None:
    page = "text\n```python\na = 1\n```\n\n  ```python fragment\n  b = 2\n  ```\n```sh\nls\n```\n"
    parsed = blocks(page)
    assert [(b.line, b.info, b.code, b.runs) for b in parsed] == [
        (3, "python", "a = 1\n", True),
        (7, "python fragment", "b = 2\n", False),
        (10, "sh", "ls\n", False),
    ]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_runs(page: Path, redis_url: str, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    page_blocks = blocks(page.read_text(encoding="utf-8"))
    if not any(b.runs for b in page_blocks):
        pytest.skip(f"{page.name} has no ```python block")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BUTTRESS_REDIS_URL", redis_url)
    monkeypatch.syspath_prepend(str(tmp_path))
    threads_before = set(threading.enumerate())
    namespace: dict[str, object] = {"__name__": "__main__", "__file__": str(page)}
    modules_before = set(sys.modules)
    try:
        number = 0
        for index, block in enumerate(page_blocks):
            if not block.runs:
                continue
            number += 1
            printed = _run(block, number, page, namespace)
            following = page_blocks[index + 1] if index + 1 < len(page_blocks) else None
            if following is not None and following.info == "text" and following.before == "prints":
                assert printed.rstrip() == following.code.rstrip(), (
                    f"{page.name}: python block {number} (line {block.line}) printed\n"
                    f"{printed}\nbut the page shows (line {following.line})\n{following.code}")
    finally:
        for name in set(sys.modules) - modules_before:  # modules a page wrote in tmp_path
            module = sys.modules.get(name)
            if str(getattr(module, "__file__", "") or "").startswith(str(tmp_path)):
                del sys.modules[name]
    _assert_threads_stopped(page, threads_before)


class _Tee(io.StringIO):
    """Keeps what a block prints and still shows it (pytest's capture, -s)."""

    def __init__(self, through: TextIO) -> None:
        super().__init__()
        self.through = through

    def write(self, text: str) -> int:
        self.through.write(text)
        return super().write(text)


def _run(block: Block, number: int, page: Path, namespace: dict[str, object]) -> str:
    """Run one block in the page's namespace; return what it printed."""
    tee = _Tee(sys.stdout)
    try:
        # Blank lines in front keep the page's line numbers in tracebacks.
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        with contextlib.redirect_stdout(tee):
            exec(code, namespace)
    except Exception as exc:
        raise AssertionError(
            f"{page.name}: python block {number} (line {block.line}) raised "
            f"{type(exc).__name__}: {exc}") from exc
    return tee.getvalue()


def _assert_threads_stopped(page: Path, before: set[threading.Thread]) -> None:
    deadline = time.monotonic() + 5.0
    while True:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, (f"{page.name} left threads running (a block must stop what it "
                      f"starts): {[t.name for t in left]}")
