"""Type checkers see buttress's real classes through ``import buttress``.

The top-level names load lazily at run time (``_LAZY`` in ``buttress/__init__.py``);
for type checkers the same names are imported under ``TYPE_CHECKING``.  These
tests run mypy on user code against the buttress the tests import (the installed
wheel in CI) and check that no lazy name is missing from what type checkers see.
"""

from __future__ import annotations

import ast
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import buttress

pytest.importorskip("mypy")

GOOD = """\
from buttress import BloomFilter, TaskScheduler, xxh64

bf = BloomFilter.for_capacity(1_000, 0.01)
bf.insert_many([1, 2, 3])
found: bool = 2 in bf
digest: int = xxh64(b"key")
with TaskScheduler(workers=1) as scheduler:
    scheduler.enqueue(lambda: None)
"""

BAD = """\
from buttress import BloomFilter

bf = BloomFilter.for_capacity(1_000, 0.01)
bf.insert_mnay([1, 2, 3])
"""


def _mypy(tmp_path: Path, *files: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    root = str(Path(buttress.__file__).resolve().parent.parent)
    if root not in [*site.getsitepackages(), site.getusersitepackages()]:
        env["MYPYPATH"] = root  # a checkout on PYTHONPATH: point mypy at it
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nignore_missing_imports = True\n")
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir",
         str(tmp_path / ".mypy_cache"), "--no-error-summary", *files],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )


def test_mypy_sees_the_real_classes(tmp_path: Path) -> None:
    """One mypy run: the misspelt method fails, the correct snippet passes."""
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "bad.py").write_text(BAD)
    done = _mypy(tmp_path, "good.py", "bad.py")
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert any(line.startswith("bad.py:4:") and "insert_mnay" in line for line in errors), (
        f"mypy did not catch bf.insert_mnay:\n{done.stdout}{done.stderr}")
    assert not [line for line in errors if line.startswith("good.py")], done.stdout
    assert done.returncode == 1


def _type_checking_names() -> set[str]:
    tree = ast.parse(Path(buttress.__file__).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in ast.walk(node):
                if isinstance(statement, ast.ImportFrom):
                    names.update(alias.asname or alias.name for alias in statement.names)
    return names


def test_every_lazy_name_is_visible_to_type_checkers() -> None:
    missing = sorted(set(buttress._LAZY) - _type_checking_names())
    assert not missing, textwrap.dedent(f"""\
        these names of _LAZY are not imported under `if TYPE_CHECKING:` in
        buttress/__init__.py, so type checkers see them as missing: {missing}""")


def test_every_lazy_name_resolves_to_its_module() -> None:
    for name, module in buttress._LAZY.items():
        value = getattr(buttress, name)
        assert getattr(sys.modules[module], name) is value
        assert name in buttress.__all__
