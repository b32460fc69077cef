"""The benchmark harness and report (``python -m buttress bench``), on tiny made-up suites.

No timed assertions: the work here is sleeps and no-ops whose verdicts are
set by construction (a target of 1000x cannot be met by equal work; a declared
noise floor wider than the target's margin makes it inconclusive).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from buttress import bench
from buttress.bench import _report
from buttress.bench._cli import run_cli

README = Path(__file__).resolve().parent.parent / "README.md"


def _suite(name: str, register: Any) -> Any:
    return SimpleNamespace(__name__=f"buttress.bench.{name}", register=register)


def _busy(n: int) -> None:
    total = 0
    for i in range(n):
        total += i


def _register_demo(session: bench.BenchSession) -> None:
    case = session.case("demo", "equal work, a target it cannot meet", unit="loop")
    case.add("buttress", lambda: _busy(2_000), items=1)
    case.add("peer", lambda: _busy(2_000), items=1)
    case.target("buttress", "peer", min_speedup=1000)
    case = session.case("demo", "a peer that is not installed", unit="loop")
    case.add("buttress", lambda: _busy(100), items=1)
    case.skip("missing peer", "missing_peer is not installed")
    case.target("buttress", "missing peer", min_speedup=2)
    session.notes.append("demo: a note that the JSON keeps")


def _register_noisy(session: bench.BenchSession) -> None:
    case = session.case("demo", "a noise floor wider than the margin", unit="loop")
    # "again" is made slower on purpose: the noise floor (bare vs bare again) is 3x.
    case.add("buttress", lambda: _busy(1_000), items=1)
    case.add("bare", lambda: _busy(1_000), items=1)
    case.add("bare again", lambda: _busy(3_000), items=1)
    case.noise_floor("bare", "bare again")
    case.target("buttress", "bare", max_ratio=1.05)


def _run(*suites: Any, **kwargs: Any) -> tuple[list[bench.Case], str]:
    out = io.StringIO()
    cases = bench.run(suites=list(suites), repeats=3, time_budget=0.0, out=out, **kwargs)
    return cases, out.getvalue()


def test_one_line_per_case_within_100_columns() -> None:
    cases, text = _run(_suite("demo", _register_demo))
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    case_lines = [line for line in lines if line.startswith("demo ")]
    assert len(case_lines) == 2
    assert "MISSED" in case_lines[0]
    assert "NOT EVALUATED" in case_lines[1]
    assert "1 missed" in text and "1 not evaluated" in text
    assert cases[0].id == "demo/equal-work-a-target-it-cannot-meet"
    assert cases[0].suite == "demo"


def test_a_noise_floor_wider_than_the_margin_is_inconclusive() -> None:
    cases, text = _run(_suite("noisy", _register_noisy))
    target = cases[0].targets[0]
    assert target.verdict == bench.INCONCLUSIVE and target.met is None
    assert target.noise >= 2.0
    assert "inconclusive" in text


def test_short_cases_get_more_rounds_within_the_budget() -> None:
    out = io.StringIO()
    cases = bench.run(suites=[_suite("demo", _register_demo)], repeats=3, time_budget=0.2,
                      out=out)
    assert cases[0].rounds > 3
    assert cases[0].rounds <= bench.MAX_ROUNDS


def test_json_has_no_nan_and_keeps_the_context(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    bench.run(suites=[_suite("demo", _register_demo)], repeats=3, time_budget=0.0,
              out=io.StringIO(), json_path=str(path))
    text = path.read_text()
    assert "NaN" not in text
    document = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert document["versions"]["buttress"]
    assert document["versions"]["python"]
    assert "commit" in document
    assert document["notes"] == ["demo: a note that the JSON keeps"]
    skipped = document["cases"][1]
    assert skipped["targets"][0]["measured"] is None  # null, not NaN
    assert [c["id"] for c in document["cases"]] == [
        "demo/equal-work-a-target-it-cannot-meet", "demo/a-peer-that-is-not-installed"]


def test_an_unwritable_json_path_fails_before_the_run(tmp_path: Path) -> None:
    ran = []
    with pytest.raises(ValueError, match="cannot write"):
        bench.run(suites=[_suite("demo", lambda s: ran.append(1))],
                  json_path=str(tmp_path / "no" / "such" / "dir.json"), out=io.StringIO())
    assert not ran


def test_unknown_suite_lists_the_suites() -> None:
    with pytest.raises(ValueError, match=r"the suites are: .*hashing"):
        bench.select_suites(["nope"])


def _cli(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "buttress", *argv], capture_output=True,
                          text=True, timeout=120)


def test_cli_help_lists_suites_and_version() -> None:
    done = _cli(["bench", "--help"])
    assert done.returncode == 0
    assert "hashing" in done.stdout and "``" not in done.stdout
    assert all(len(line) <= 100 for line in done.stdout.splitlines())
    version = _cli(["--version"])
    assert version.returncode == 0 and version.stdout.startswith("buttress ")
    unknown = _cli(["bench", "--only", "nope"])
    assert unknown.returncode == 2 and "hashing" in unknown.stderr


def _save(tmp_path: Path, name: str, register: Any) -> Path:
    path = tmp_path / name
    bench.run(suites=[_suite("demo", register)], repeats=3, time_budget=0.0,
              out=io.StringIO(), json_path=str(path))
    return path


def test_strict_fails_on_missed_and_not_evaluated(tmp_path: Path) -> None:
    path = _save(tmp_path, "a.json", _register_demo)
    args = SimpleNamespace(verbose=False, repeats=None, time_budget=None, json=None, plot=None,
                           from_json=str(path), wide=False, markdown=False, readme=None,
                           only=None, quick=False, strict=True)
    assert run_cli(SimpleNamespace(error=pytest.fail), args) == 1  # type: ignore[arg-type]
    args.strict = False
    assert run_cli(SimpleNamespace(error=pytest.fail), args) == 0  # type: ignore[arg-type]


def test_compare_names_the_missing_cases(tmp_path: Path) -> None:
    a = _report.read_json(str(_save(tmp_path, "a.json", _register_demo)))
    b = _report.read_json(str(_save(tmp_path, "b.json", _register_noisy)))
    out = io.StringIO()
    _report.compare(a, b, ("a.json", "b.json"), out)
    text = out.getvalue()
    assert "cases only in a.json (2)" in text
    assert "demo/equal-work-a-target-it-cannot-meet" in text
    assert "cases only in b.json (1)" in text


def test_compare_flags_a_change_beyond_the_noise() -> None:
    def document(seconds: float) -> dict[str, Any]:
        row = {"implementation": "buttress", "items": 1, "seconds_per_item": seconds,
               "q1": seconds * 0.99, "q3": seconds * 1.01, "samples": [], "note": ""}
        return {"cases": [{"id": "s/c", "suite": "s", "name": "c", "unit": "x",
                           "rows": [row], "skipped": [], "targets": []}]}

    out = io.StringIO()
    assert _report.compare(document(1e-6), document(2e-6), ("a", "b"), out) == 1
    assert "2.00x slower" in out.getvalue()
    assert _report.compare(document(1e-6), document(1.001e-6), ("a", "b"), io.StringIO()) == 0


def test_markdown_and_the_readme_block(tmp_path: Path) -> None:
    document = _report.read_json(str(_save(tmp_path, "a.json", _register_demo)))
    table = _report.markdown(document)
    assert table.startswith("| suite | case |")
    assert "missed" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{_report.README_START}\nold\n{_report.README_END}\nrest\n")
    _report.update_readme(str(readme), table)
    text = readme.read_text()
    assert "old" not in text and table in text and text.endswith("rest\n")
    # The real README keeps the marker block the table is generated into.
    real = README.read_text(encoding="utf-8")
    assert _report.README_START in real and _report.README_END in real


def test_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    document = _report.read_json(str(_save(tmp_path, "a.json", _register_demo)))
    _report.plot(document, str(tmp_path / "targets.png"))
    assert (tmp_path / "targets.png").stat().st_size > 1000


def test_library_logs_are_silent_without_verbose(tmp_path: Path) -> None:
    code = (
        "import logging, sys\n"
        "from buttress.bench._cli import _configure_logging\n"
        "_configure_logging(verbose=False)\n"
        "logging.getLogger('buttress.scheduler').warning('normal -> shedding')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert "shedding" not in done.stderr


def test_the_pytest_benchmark_suite_collects_the_registered_cases() -> None:
    """bench/test_bench.py hands every registered case to pytest-benchmark (one definition)."""
    pytest.importorskip("pytest_benchmark")
    root = README.parent
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--collect-only", "-q", "--bench-quick",
         "--bench-suite", "hashing", "-p", "no:cacheprovider"],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_case[hashing/xxh64-many-1-000-000-uint64-keys[buttress]]" in done.stdout


def test_a_peer_that_fails_to_import_is_not_called_missing(tmp_path, monkeypatch):
    """An installed but broken peer (a mismatched release) says so, with its error."""
    (tmp_path / "broken_peer_for_bench.py").write_text(
        "raise ImportError('cannot import name model_dump from taskiq.compat')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with bench.BenchSession(quick=True) as session:
        assert session.peer("broken_peer_for_bench") is None
        assert session.peer_problem("broken_peer_for_bench") == (
            "broken_peer_for_bench is installed but fails to import: ImportError: "
            "cannot import name model_dump from taskiq.compat")
        assert "is not installed" in session.peer_problem("no_such_peer_for_bench")
        assert session.peer_problem("json") is None
