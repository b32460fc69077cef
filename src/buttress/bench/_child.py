"""Child processes of the benchmark suites: their environment and their line protocol.

Suites run servers, load generators, workers and A/B runners in child
processes that must import the very buttress under test (installed or from a
checkout), or an older tree's for a before/after case (``OLD_SRC_ENV``).  The
line protocol is one word per answer (``READY``, ``DONE 0.25``...), read one
line at a time.
"""

from __future__ import annotations

import os
import subprocess

__all__ = ["OLD_SRC_ENV", "child_env", "close_child", "expect", "source_root"]

# Names the src/ directory of an older checkout, for the before/after cases.
OLD_SRC_ENV = "BUTTRESS_BENCH_OLD_SRC"


def source_root() -> str:
    """The directory that holds this very buttress package (site-packages or a src/)."""
    import buttress

    return os.path.dirname(os.path.dirname(os.path.abspath(buttress.__file__)))


def child_env(src: str | None = None) -> dict[str, str]:
    """The environment with ``src`` (default :func:`source_root`) first on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH")
    first = src if src is not None else source_root()
    return {**os.environ, "PYTHONPATH": first + (os.pathsep + path if path else "")}


def expect(process: subprocess.Popen[str], word: str) -> str:
    """Read one answer line that starts with ``word``; the rest of it (the child dies else)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(word + " ") and line.strip() != word:
        process.kill()
        raise RuntimeError(f"bench helper {process.args!r} said {line!r}, expected {word}")
    return line[len(word):].strip()


def close_child(process: subprocess.Popen[str]) -> None:
    """End a child that stops at stdin EOF: close its stdin, wait, kill after 10 s."""
    if process.poll() is None:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
