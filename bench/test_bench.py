"""Every registered benchmark case, one pytest-benchmark test per implementation.

The suites register their cases (and start what they need, such as a Redis
server) once, when this module's tests are collected; the session closes when
pytest ends.  Test ids are ``<case id>[<implementation>]``.
"""

from __future__ import annotations

from typing import Any

import pytest

from buttress.bench import BenchSession, Case, select_suites

_SESSION_KEY = pytest.StashKey[BenchSession]()


def _session(config: pytest.Config) -> BenchSession:
    if _SESSION_KEY not in config.stash:
        session = BenchSession(quick=config.getoption("--bench-quick"))
        config.add_cleanup(session.close)
        config.stash[_SESSION_KEY] = session
        for suite in select_suites(config.getoption("--bench-suite") or None):
            session.register(suite)
    return config.stash[_SESSION_KEY]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_case" not in metafunc.fixturenames:
        return
    session = _session(metafunc.config)
    metafunc.parametrize("bench_case", [
        pytest.param((case, row.implementation), id=f"{case.id}[{row.implementation}]")
        for case in session.cases for row in case.rows
    ])


def test_case(bench_case: tuple[Case, str], benchmark: Any) -> None:
    case, implementation = bench_case
    work, setup = case.work(implementation)
    row = case.row(implementation)
    assert row is not None
    benchmark.group = case.id
    benchmark.extra_info.update(suite=case.suite, unit=case.unit, items=row.items,
                                note=row.note)
    if setup is None:
        benchmark.pedantic(work, rounds=case.repeats, warmup_rounds=1)
    else:
        benchmark.pedantic(work, setup=lambda: ((setup(),), {}), rounds=case.repeats)
