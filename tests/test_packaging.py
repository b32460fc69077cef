"""The package as installed: what CI tests is the wheel, not the checkout.

CI (``.ci/run``) installs the wheel built from the sdist into a new virtualenv
and sets ``BUTTRESS_TEST_INSTALLED=1``; then buttress must come from that
virtualenv's site-packages, never from ``src/`` (where a fresh clone has no
compiled extensions and a file missing from the wheel would go unnoticed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import buttress

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(os.environ.get("BUTTRESS_TEST_INSTALLED") != "1",
                    reason="set by CI, which tests the installed wheel")
def test_the_tests_import_the_installed_wheel() -> None:
    location = Path(buttress.__file__).resolve()
    assert ROOT / "src" not in location.parents, f"imported from the checkout: {location}"
    assert "site-packages" in location.parts
    # The processes tests start see the same package.
    done = subprocess.run([sys.executable, "-c", "import buttress; print(buttress.__file__)"],
                          capture_output=True, text=True, check=True, timeout=60)
    assert Path(done.stdout.strip()).resolve() == location


def test_the_native_extensions_and_package_data_are_installed() -> None:
    package = Path(buttress.__file__).parent
    for pyx in sorted((ROOT / "ext" / "buttress").glob("*.pyx")):
        assert list(package.glob(f"{pyx.stem}.*.so")) or list(package.glob(f"{pyx.stem}.*.pyd")) \
            or list(package.glob(f"{pyx.stem}.so")), f"no compiled {pyx.stem} next to {package}"
    assert (package / "py.typed").exists()
    for source in (ROOT / "src" / "buttress").rglob("*"):
        if source.suffix in (".lua", ".pyi"):
            installed = package / source.relative_to(ROOT / "src" / "buttress")
            assert installed.exists(), f"{source.name} is not installed ({installed})"


def test_version_on_the_command_line() -> None:
    done = subprocess.run([sys.executable, "-m", "buttress", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"buttress {buttress.__version__}"


def test_a_late_sigterm_does_not_turn_a_finished_command_into_a_kill() -> None:
    # A harness or orchestrator may send SIGTERM again after the service drained, while
    # the interpreter is still exiting; the exit code must stay the command's own.  The
    # atexit hook sends it at that point: after main() returned, before the process ends.
    script = ("import atexit, os, runpy, signal\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), "
              "print('survived', flush=True)))\n"
              "runpy.run_module('buttress', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", script, "drain", "--port", "1",
                           "--timeout", "5"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done  # drain's own answer: nothing listens on port 1
    assert "could not drain" in done.stderr
    assert done.stdout.strip() == "survived"
