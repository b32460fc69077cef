"""The benchmark harness behind ``python -m buttress bench`` (the main job).

Every public submodule of ``buttress.bench`` is a component suite with a
``register(session)`` function.  A suite adds *cases*; a case times several
implementations of the same work on the same data, interleaving their rounds
(in a rotating order) so machine noise hits them alike, and reports each one's
median time per item, its spread (interquartile range) and its ratio to
buttress.  *Targets* state the speedup buttress promises over a baseline; the
report says for each whether this run met it, missed it, or could not tell
because the noise was wider than the distance to the target (*inconclusive*).

Absolute times drift on shared machines; the ratios, measured side by side in
one run, are what the targets are about.

A suite looks like this::

    ORDER = 10          # position in the report

    def register(session):
        keys = ...
        case = session.case("hash", "xxh64_many, 1M uint64 keys", unit="key")
        case.add("buttress", lambda: xxh64_many(keys), items=len(keys))
        case.add("xxhash loop", lambda: [xxh64_intdigest(k) for k in encoded], items=len(keys))
        case.target("buttress", "xxhash loop", min_speedup=20)

Each case is defined once: ``python -m buttress bench`` runs it and judges
the targets, and ``bench/test_bench.py`` hands the same implementations to
pytest-benchmark.

How a case is timed (:meth:`Case.execute`):

* Every round runs each implementation once (its ``setup`` untimed, the
  garbage collector run before the round and off during each timed call);
  the order rotates per round.
* The first round is a warm-up and is discarded when it took less than a
  quarter of the case's time budget (short cases: caches, allocator, branch
  predictors settle; long cases keep every round).
* Then rounds repeat at least ``repeats`` times, and short cases get more
  rounds until the time budget is spent (``--time-budget``; at most
  ``MAX_ROUNDS``), so no suite has to hand-raise its repeat count.
* A target's figure is the median of the per-round ratios (paired: the two
  sides ran back to back), its spread their interquartile range.  Its noise
  is the wider of that spread and the case's declared *noise floor*: two
  implementations doing the same work (say the bare app against a second bare
  app), whose ratio shows what "no difference" measures in this run.  When
  the measured figure is closer to the target than the noise, the verdict is
  ``inconclusive``, not MET or MISSED.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import importlib.metadata
import importlib.util
import logging
import math
import os
import pkgutil
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TextIO

from buttress._version import __version__

__all__ = [
    "BenchSession",
    "Case",
    "Row",
    "Target",
    "discover_suites",
    "run",
    "run_session",
    "suite_names",
]

logger = logging.getLogger("buttress.bench")

OURS = "buttress"
MAX_ROUNDS = 50
# Seconds a case may spend on extra rounds (beyond its minimum) by default.
TIME_BUDGET = {True: 0.5, False: 2.0}  # quick, full

# Versions the JSON records when a suite loaded them: what buttress runs on, and peers.
LIBRARIES = ("numpy", "xxhash", "redis", "uvicorn", "pyarrow")
PEERS = ("rbloom", "fastbloom_rs", "pybloomfilter", "rq", "huey", "celery", "dramatiq", "saq",
         "taskiq", "taskiq_redis", "arq", "gunicorn")

MET, MISSED, INCONCLUSIVE, NOT_EVALUATED = "met", "missed", "inconclusive", "not evaluated"


@dataclass
class Row:
    """One implementation's timing within a case."""

    implementation: str
    items: int
    seconds_per_item: float = float("nan")  # median over the rounds
    samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def quartiles(self) -> tuple[float, float]:
        return _quartiles(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range as a fraction of the median (0.04 = +-4%)."""
        q1, q3 = self.quartiles
        median = self.seconds_per_item
        if not self.samples or not median or median != median:
            return float("nan")
        return (q3 - q1) / median


@dataclass
class Target:
    """A promise: ``faster`` is at least ``min_speedup`` x faster per item than ``than``.

    ``max_ratio`` instead bounds ``faster``'s time as a multiple of ``than``'s
    (for "within 2x of" or "at most 5% overhead" promises).
    """

    faster: str
    than: str
    min_speedup: float | None = None
    max_ratio: float | None = None
    measured: float = float("nan")  # speedup (than / faster) or ratio (faster / than)
    # MET or MISSED: the verdict is clear; None: inconclusive or not evaluated.
    met: bool | None = None
    verdict: str = NOT_EVALUATED
    low: float = float("nan")  # interquartile range of the per-round figures
    high: float = float("nan")
    noise: float = float("nan")  # multiplicative: 1.28 means figures within +-28% are noise

    @property
    def threshold(self) -> float:
        value = self.min_speedup if self.min_speedup is not None else self.max_ratio
        assert value is not None
        return value

    def describe(self) -> str:
        if self.min_speedup is not None:
            return f"{self.faster} >= {self.min_speedup:g}x faster than {self.than}"
        return f"{self.faster} time <= {self.max_ratio:g}x {self.than}"

    def figure(self) -> str:
        """The measured figure in words: ``31.2x faster`` or ``1.03x the time``."""
        if self.measured != self.measured:
            return "-"
        if self.min_speedup is not None:
            return f"{self.measured:.3g}x faster"
        return f"{self.measured:.3g}x the time"


class Case:
    """Implementations of one piece of work, timed side by side."""

    def __init__(self, component: str, name: str, unit: str, repeats: int,
                 *, suite: str = "", case_id: str | None = None,
                 time_budget: float = 0.0) -> None:
        self.component = component
        self.suite = suite or component
        self.name = name
        self.id = case_id or f"{self.suite}/{_slug(name)}"
        self.unit = unit
        self.repeats = repeats
        self.time_budget = time_budget
        self.rows: list[Row] = []
        self.targets: list[Target] = []
        self.skipped: list[tuple[str, str]] = []
        self.noise_pair: tuple[str, str] | None = None
        self.noise_floor_ratio: float = float("nan")
        self.seconds: float = 0.0  # wall time of execute(), setups included
        self._work: dict[str, tuple[Callable[..., Any], Callable[[], Any] | None]] = {}

    def add(
        self,
        implementation: str,
        work: Callable[..., Any],
        *,
        items: int,
        setup: Callable[[], Any] | None = None,
        note: str = "",
    ) -> None:
        """Time ``work()`` (or ``work(setup())``, setup untimed) as ``items`` units of work."""
        if items <= 0:
            raise ValueError(f"items must be > 0, got {items}")
        if implementation in self._work:
            raise ValueError(f"implementation {implementation!r} added twice to {self.name!r}")
        self._work[implementation] = (work, setup)
        self.rows.append(Row(implementation, items, note=note))

    def skip(self, implementation: str, reason: str) -> None:
        """Record that an implementation (usually a peer) is not measured, and why."""
        self.skipped.append((implementation, reason))

    def target(
        self,
        faster: str,
        than: str,
        *,
        min_speedup: float | None = None,
        max_ratio: float | None = None,
    ) -> None:
        if (min_speedup is None) == (max_ratio is None):
            raise ValueError("give exactly one of min_speedup and max_ratio")
        self.targets.append(Target(faster, than, min_speedup, max_ratio))

    def noise_floor(self, first: str, second: str) -> None:
        """Declare two implementations that do the same work: their ratio is the noise floor.

        A target of this case whose figure lies closer to its threshold than
        this ratio (either way) is reported as inconclusive.
        """
        self.noise_pair = (first, second)

    def row(self, implementation: str) -> Row | None:
        return next((r for r in self.rows if r.implementation == implementation), None)

    def work(self, implementation: str) -> tuple[Callable[..., Any], Callable[[], Any] | None]:
        """``(work, setup)`` of one implementation (for pytest-benchmark)."""
        return self._work[implementation]

    def execute(self) -> None:
        """Run the rounds (see the module docstring), then judge the targets."""
        started = time.perf_counter()
        if not self.rows:  # every implementation was skipped
            self._judge()
            return
        # Objects alive now (the suite's data) are frozen out of the collector's
        # reach, so the collection before each round costs little.
        gc.collect()
        gc.freeze()
        try:
            self._round(0)
            if time.perf_counter() - started < self.time_budget / 4:
                for row in self.rows:  # a short case: the first round was a warm-up
                    row.samples.clear()
            rounds = 1 if self.rows[0].samples else 0
            budget_end = time.perf_counter() + self.time_budget
            while rounds < self.repeats or (
                rounds < MAX_ROUNDS and time.perf_counter() < budget_end
            ):
                self._round(rounds)
                rounds += 1
        finally:
            gc.unfreeze()
        for row in self.rows:
            row.seconds_per_item = statistics.median(row.samples) if row.samples else math.nan
        self.seconds = time.perf_counter() - started
        self._judge()

    @property
    def rounds(self) -> int:
        return len(self.rows[0].samples) if self.rows else 0

    def _round(self, index: int) -> None:
        # Rotate the order each round so no implementation always runs first
        # (after an idle spell) or last (after the others warmed the caches).
        shift = index % len(self.rows) if self.rows else 0
        gc.collect()  # once a round: the collector is off during each timed call
        for row in self.rows[shift:] + self.rows[:shift]:
            work, setup = self._work[row.implementation]
            row.samples.append(_time_once(work, setup) / row.items)

    def _paired(self, first: Row, second: Row) -> list[float]:
        return [a / b for a, b in zip(first.samples, second.samples, strict=True) if b > 0]

    def _judge(self) -> None:
        floor = 1.0
        if self.noise_pair is not None:
            a, b = (self.row(name) for name in self.noise_pair)
            if a is not None and b is not None and a.samples and b.samples:
                ratio = a.seconds_per_item / b.seconds_per_item
                self.noise_floor_ratio = ratio
                floor = max(ratio, 1 / ratio)
        for target in self.targets:
            fast, slow = self.row(target.faster), self.row(target.than)
            if fast is None or slow is None or not fast.samples or not slow.samples:
                target.verdict, target.met = NOT_EVALUATED, None
                continue
            # Paired: the two sides ran back to back in each round, so the
            # per-round ratio cancels most of the drift a loaded machine adds.
            per_round = self._paired(fast, slow)  # time ratios, faster / than
            if target.min_speedup is not None:
                figures = [1 / r for r in per_round if r > 0]
            else:
                figures = per_round
            if not figures:  # no time measured at all: nothing to judge
                target.verdict, target.met = NOT_EVALUATED, None
                continue
            target.measured = statistics.median(figures)
            target.low, target.high = _quartiles(figures)
            spread = (math.sqrt(target.high / target.low)
                      if target.low > 0 and target.high > 0 else 1.0)
            target.noise = max(floor, spread)
            distance = abs(math.log(target.measured) - math.log(target.threshold))
            if distance <= math.log(target.noise):
                target.verdict, target.met = INCONCLUSIVE, None
                continue
            if target.min_speedup is not None:
                target.met = target.measured >= target.min_speedup
            else:
                target.met = target.measured <= target.threshold
            target.verdict = MET if target.met else MISSED

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Case:
        """A case back from its JSON form, its targets judged again from the samples."""
        case = cls(data.get("component", data["suite"]), data["name"], data["unit"],
                   repeats=int(data.get("rounds") or 1), suite=data["suite"],
                   case_id=data["id"])
        case.seconds = data.get("seconds") or 0.0
        for row in data["rows"]:
            samples = [float(v) for v in row.get("samples") or []]
            median = statistics.median(samples) if samples else (
                row.get("seconds_per_item") or math.nan)
            case.rows.append(Row(row["implementation"], row["items"], median, samples,
                                 row.get("note", "")))
        case.skipped = [(s["implementation"], s["reason"]) for s in data["skipped"]]
        floor = data.get("noise_floor")
        if floor:
            case.noise_pair = (floor["implementations"][0], floor["implementations"][1])
        for target in data["targets"]:
            case.target(target["faster"], target["than"], min_speedup=target["min_speedup"],
                        max_ratio=target["max_ratio"])
        case._judge()
        return case

    def to_dict(self) -> dict[str, Any]:
        """The case as it goes into the JSON file (and what the reports read)."""
        return {
            "id": self.id,
            "suite": self.suite,
            "component": self.component,
            "name": self.name,
            "unit": self.unit,
            "rounds": self.rounds,
            "seconds": self.seconds,
            "rows": [
                {
                    "implementation": r.implementation,
                    "items": r.items,
                    "seconds_per_item": r.seconds_per_item,
                    "q1": r.quartiles[0],
                    "q3": r.quartiles[1],
                    "samples": r.samples,
                    "note": r.note,
                }
                for r in self.rows
            ],
            "skipped": [{"implementation": i, "reason": r} for i, r in self.skipped],
            "noise_floor": None if self.noise_pair is None else {
                "implementations": list(self.noise_pair),
                "ratio": self.noise_floor_ratio,
            },
            "targets": [
                {
                    "faster": t.faster,
                    "than": t.than,
                    "min_speedup": t.min_speedup,
                    "max_ratio": t.max_ratio,
                    "measured": t.measured,
                    "q1": t.low,
                    "q3": t.high,
                    "noise": t.noise,
                    "verdict": t.verdict,
                    "description": t.describe(),
                    "figure": t.figure(),
                }
                for t in self.targets
            ],
        }


def _quartiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _time_once(work: Callable[..., Any], setup: Callable[[], Any] | None) -> float:
    prepared = setup() if setup is not None else None
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        if setup is None:
            work()
        else:
            work(prepared)
        return time.perf_counter() - start
    finally:
        if was_enabled:
            gc.enable()


class BenchSession:
    """State shared by the suites of one run: size, repeats, a Redis server, the cases."""

    def __init__(self, *, quick: bool = False, repeats: int | None = None,
                 time_budget: float | None = None) -> None:
        if repeats is not None and repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if time_budget is not None and not time_budget >= 0:
            raise ValueError(f"time_budget must be >= 0 seconds, got {time_budget}")
        self.quick = quick
        self.repeats = repeats if repeats is not None else (3 if quick else 5)
        self.time_budget = TIME_BUDGET[quick] if time_budget is None else time_budget
        self.cases: list[Case] = []
        self.notes: list[str] = []
        self.peers: dict[str, str | None] = {}  # module -> installed version (None: missing)
        self._peer_problems: dict[str, str] = {}  # module -> why it could not be imported
        self.suite = ""  # the suite registering now (set by run())
        self._stack = contextlib.ExitStack()
        self._redis_url: str | None = None

    def case(self, component: str, name: str, *, unit: str = "item",
             repeats: int | None = None, case_id: str | None = None) -> Case:
        case = Case(component, name, unit, repeats or self.repeats, suite=self.suite,
                    case_id=case_id, time_budget=self.time_budget)
        self.cases.append(case)
        return case

    def peer(self, module: str) -> ModuleType | None:
        """Import a comparison peer, or return None (the caller records the skip).

        :meth:`peer_problem` then says why: not installed, or installed but
        failing to import (a broken or mismatched release is not "missing").
        """
        try:
            imported = importlib.import_module(module)
        except ImportError as exc:
            self.peers[module] = None
            try:
                installed = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                installed = False
            self._peer_problems[module] = (
                f"{module} is installed but fails to import: {type(exc).__name__}: {exc}"
                if installed else f"{module} is not installed (pip install 'buttress[compare]')")
            if installed:
                logger.warning("%s", self._peer_problems[module])
            return None
        self.peers[module] = _version_of(module)
        return imported

    def peer_problem(self, module: str) -> str | None:
        """Why :meth:`peer` returned None for ``module`` (None: it imports)."""
        if module not in self.peers:  # not tried yet (a failed import is not retried)
            self.peer(module)
        return self._peer_problems.get(module)

    def redis_url(self) -> str:
        """A Redis for the suites: ``BUTTRESS_REDIS_URL`` or a server started for this run."""
        if self._redis_url is None:
            from buttress.testing import redis_url

            self._redis_url = self._stack.enter_context(redis_url())
        return self._redis_url

    def on_close(self, callback: Callable[..., Any], /, *args: Any) -> None:
        """Call ``callback(*args)`` when the run ends, before the session's Redis stops.

        Callbacks run last-registered first, so a suite's workers and connections
        are closed before the server they talk to.
        """
        self._stack.callback(callback, *args)

    def register(self, suite: ModuleType) -> list[Case]:
        """Let one suite add its cases; returns them (not yet executed)."""
        before = len(self.cases)
        self.suite = suite_name(suite)
        try:
            suite.register(self)
        finally:
            self.suite = ""
        return self.cases[before:]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> BenchSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()  # scans site-packages: once


def _version_of(module: str) -> str | None:
    top = module.split(".")[0]
    for dist in _distributions().get(top, [top]):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return None


def suite_name(suite: ModuleType) -> str:
    return suite.__name__.rsplit(".", 1)[-1]


def suite_names() -> list[str]:
    """The suites' names, without importing them (for ``--help`` and error messages)."""
    import buttress.bench as package

    return sorted(info.name for info in pkgutil.iter_modules(package.__path__)
                  if not info.name.startswith("_"))


def discover_suites() -> list[ModuleType]:
    """Import every public submodule of ``buttress.bench`` that has ``register``."""
    suites = []
    for name in suite_names():
        module = importlib.import_module(f"{__name__}.{name}")
        if callable(getattr(module, "register", None)):
            suites.append(module)
    return sorted(suites, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def select_suites(only: list[str] | None) -> list[ModuleType]:
    """The suites named in ``only`` (all when empty); ValueError lists the known ones."""
    if only:
        unknown = sorted(set(only) - set(suite_names()))
        if unknown:
            raise ValueError(f"unknown benchmark suite(s): {', '.join(unknown)}; "
                             f"the suites are: {', '.join(suite_names())}")
    suites = discover_suites()
    return [s for s in suites if not only or suite_name(s) in only]


def check_writable(path: str) -> None:
    """Fail now, not after a long run, when ``path`` cannot be written."""
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write the results to {path!r}: {exc.strerror}") from None
    if not existed:
        os.remove(path)


def run(
    *,
    quick: bool = False,
    only: list[str] | None = None,
    repeats: int | None = None,
    json_path: str | None = None,
    time_budget: float | None = None,
    wide: bool = False,
    out: TextIO = sys.stdout,
    suites: list[ModuleType] | None = None,
) -> list[Case]:
    """Run the suites (all, or those named in ``only``) and report them; returns the cases.

    ``json_path`` is checked before anything runs.
    """
    from buttress.bench import _report

    if suites is None:
        suites = select_suites(only)
    if json_path:
        check_writable(json_path)
    with BenchSession(quick=quick, repeats=repeats, time_budget=time_budget) as session:
        run_session(session, suites, wide=wide, out=out)
        if json_path:
            _report.write_json(results_document(session, quick=quick), json_path)
        return session.cases


def run_session(session: BenchSession, suites: list[ModuleType], *, wide: bool = False,
                out: TextIO = sys.stdout) -> None:
    """Register and execute each suite's cases, printing a line per case as it ends.

    ``wide`` prints the full table (every implementation, every target) at the
    end instead.  The summary (targets met, missed...) and the notes follow.
    """
    from buttress.bench import _report

    if not wide:
        _report.print_header(out)
    for suite in suites:
        started = time.perf_counter()
        for case in session.register(suite):
            logger.info("running %s", case.id)
            case.execute()
            if not wide:
                _report.print_line(case.to_dict(), out)
        logger.info("suite %s took %.1fs", suite_name(suite), time.perf_counter() - started)
    document = results_document(session, quick=session.quick)
    if wide:
        _report.print_wide(document["cases"], out)
    _report.print_summary(document, out)


def results_document(session: BenchSession, *, quick: bool) -> dict[str, Any]:
    """Everything one run found, with the context needed to compare it with another."""
    versions: dict[str, Any] = {"buttress": __version__, "python": sys.version.split()[0]}
    for module in LIBRARIES:
        if module in sys.modules:
            versions[module] = _version_of(module)
    peers = dict(session.peers)
    for module in PEERS:  # peers a suite imported without session.peer()
        if module in sys.modules and module not in peers:
            peers[module] = _version_of(module)
    return {
        "format": 2,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": quick,
        "commit": _commit(),
        "versions": versions,
        "peers": dict(sorted(peers.items())),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "notes": list(session.notes),
        "cases": [c.to_dict() for c in session.cases],
    }


def _commit() -> str | None:
    """The git commit of the code being measured (the checkout it came from), if known."""
    if os.environ.get("BUTTRESS_COMMIT"):
        return os.environ["BUTTRESS_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    for directory in (here, os.getcwd()):
        try:
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, text=True,
                                  capture_output=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=directory, text=True, capture_output=True, timeout=5)
            return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return None
