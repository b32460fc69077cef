"""pytest-benchmark suites (``pytest bench/ --benchmark-only``), kept apart from the tests.

These mirror the side-by-side cases of ``python -m buttress bench``; that command is
the one that prints ratios and judges targets.
"""
