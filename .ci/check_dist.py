"""Check the built distributions hold every file the build and the package need.

Usage: python .ci/check_dist.py dist/

* The sdist must contain every tracked file under ext/ and src/ (the build
  needs the .pyx, .pxd and .h files; the package needs its .py, .pyi, .lua
  and py.typed) and every tracked file of the test suite, the benchmarks, the
  docs, the examples and the deploy manifests (a packager runs the tests from
  the sdist), plus README.md, pyproject.toml, setup.py and MANIFEST.in.
* The wheel must contain every tracked file under src/buttress (as
  buttress/...) and one compiled extension module per ext/buttress/*.pyx.

The list of tracked files comes from ``git ls-files``, so a file added to the
repository but forgotten by MANIFEST.in or the package data fails here.
Exit status 1 lists what is missing.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
IN_SDIST = ["ext", "src", "tests", "bench", "docs", "examples", "deploy",
            "README.md", "pyproject.toml", "setup.py", "MANIFEST.in"]


def tracked(*paths: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", *paths], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    # A file deleted in the work tree but not yet committed is not needed.
    return sorted(p for p in out.splitlines() if (ROOT / p).exists())


def sdist_missing(sdist: Path) -> list[str]:
    with tarfile.open(sdist) as tar:
        # Members are "<name>-<version>/<path>".
        held = {str(PurePosixPath(*PurePosixPath(m).parts[1:])) for m in tar.getnames()}
    return [p for p in tracked(*IN_SDIST) if p not in held]


def wheel_missing(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as whl:
        held = set(whl.namelist())
    missing = [p for p in tracked("src/buttress")
               if str(PurePosixPath(p).relative_to("src")) not in held]
    for pyx in tracked("ext/buttress"):
        if pyx.endswith(".pyx"):
            stem = PurePosixPath(pyx).stem
            if not any(name.startswith(f"buttress/{stem}.") and name.endswith((".so", ".pyd"))
                       for name in held):
                missing.append(f"buttress/{stem}.<extension> (compiled from {pyx})")
    return missing


def main(argv: list[str]) -> int:
    dist = Path(argv[1]) if len(argv) > 1 else ROOT / "dist"
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        print(f"expected one sdist and one wheel in {dist}, found {sdists + wheels}")
        return 1
    status = 0
    for label, missing in (("sdist " + sdists[0].name, sdist_missing(sdists[0])),
                           ("wheel " + wheels[0].name, wheel_missing(wheels[0]))):
        if missing:
            status = 1
            print(f"{label} is missing {len(missing)} file(s):")
            for path in missing:
                print(f"  {path}")
        else:
            print(f"{label}: every needed file is there")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
