"""Builds buttress's Cython extensions; all other metadata lives in pyproject.toml.

Every ``ext/buttress/<name>.pyx`` becomes the extension ``buttress.<name>``.
Compiler directives are set here, once.  ``BUTTRESS_CYTHON_DEBUG=1`` rebuilds
with bounds checking, wraparound and initialised-variable checks switched back
on (and C assertions enabled), for chasing a memory bug.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
EXT_DIR = Path("ext") / "buttress"


def _require(module: str, why: str) -> object:
    try:
        return __import__(module)
    except ImportError:
        sys.exit(
            f"buttress: building the native extensions needs {module} ({why}). "
            f"Install it with `pip install {module}`, or let pip do it by installing "
            f"buttress with `pip install .` (build isolation reads pyproject.toml)."
        )


def _extensions() -> list[Extension]:
    numpy = _require("numpy", "the extensions read and write numpy buffers")
    _require("Cython", "the extensions are written in Cython 3")
    from Cython.Build import cythonize

    debug = os.environ.get("BUTTRESS_CYTHON_DEBUG", "") not in ("", "0")
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": not debug,
        "embedsignature": True,
        "binding": True,
    }
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    if not debug:
        macros.append(("NDEBUG", None))
    sources = sorted((HERE / EXT_DIR).glob("*.pyx"))
    if not sources:
        sys.exit(f"buttress: no Cython sources found in {HERE / EXT_DIR}")
    # A change to a C kernel's header rebuilds the extensions that may include it.
    headers = [str(p.relative_to(HERE)) for p in sorted((HERE / "ext").rglob("*.h"))]
    extensions = [
        Extension(
            f"buttress.{src.stem}",
            [str(EXT_DIR / src.name)],
            include_dirs=[numpy.get_include(), str(EXT_DIR)],  # type: ignore[attr-defined]
            depends=headers,
            define_macros=macros,
        )
        for src in sources
    ]
    return cythonize(  # type: ignore[no-any-return]
        extensions,
        compiler_directives=directives,
        include_path=["ext"],
        build_dir="build/cython-debug" if debug else "build/cython",
    )


def _compile_args(compiler_type: str) -> list[str]:
    """Optimisation flags in the compiler's own spelling (MSVC does not read -O3)."""
    debug = os.environ.get("BUTTRESS_CYTHON_DEBUG", "") not in ("", "0")
    if compiler_type == "msvc":
        return ["/Od", "/Zi"] if debug else ["/O2"]
    return ["-O0", "-g"] if debug else ["-O3"]


class BuildExtExplained(build_ext):
    """build_ext with per-compiler flags that says what is missing when the toolchain fails."""

    def build_extensions(self) -> None:
        args = _compile_args(self.compiler.compiler_type)
        for extension in self.extensions:
            extension.extra_compile_args = [*args, *extension.extra_compile_args]
        super().build_extensions()

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            sys.stderr.write(
                f"\nbuttress: compiling the Cython extensions failed ({exc}).\n"
                "It needs a C compiler (gcc, clang or MSVC) and the Python development "
                "headers (Debian/Ubuntu: `apt-get install build-essential python3-dev`; "
                "Windows: the Visual Studio Build Tools).\n\n"
            )
            raise


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtExplained})
