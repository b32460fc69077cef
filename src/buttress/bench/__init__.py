"""The benchmark harness behind ``python -m buttress bench`` (the main job).

Every public submodule of ``buttress.bench`` is a component suite with a
``register(session)`` function.  A suite adds *cases*; a case times several
implementations of the same work on the same data, interleaving their repeats (in a rotating order)
so machine noise hits them alike, and reports each one's median time per item
and its ratio to buttress.  *Targets* state the speedup buttress promises over
a baseline; the table says for each whether this run met it, with the figure.

Absolute times drift on shared machines; the ratios, measured side by side in
one run, are what the targets are about.

A suite looks like this::

    ORDER = 10          # position in the table

    def register(session):
        keys = ...
        case = session.case("hash", "xxh64_many, 1M uint64 keys", unit="key")
        case.add("buttress", lambda: xxh64_many(keys), items=len(keys))
        case.add("xxhash loop", lambda: [xxh64_intdigest(k) for k in encoded], items=len(keys))
        case.target("buttress", "xxhash loop", min_speedup=20)
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import pkgutil
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any, TextIO

__all__ = ["BenchSession", "Case", "Row", "Target", "discover_suites", "run"]

logger = logging.getLogger("buttress.bench")

OURS = "buttress"


@dataclass
class Row:
    """One implementation's timing within a case."""

    implementation: str
    items: int
    seconds_per_item: float = float("nan")  # median over the repeats
    samples: list[float] = field(default_factory=list)
    note: str = ""


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
    met: bool | None = None  # None: could not be evaluated (a side was skipped)

    def describe(self) -> str:
        if self.min_speedup is not None:
            return f"{self.faster} >= {self.min_speedup:g}x faster than {self.than}"
        return f"{self.faster} time <= {self.max_ratio:g}x {self.than}"


class Case:
    """Implementations of one piece of work, timed side by side."""

    def __init__(self, component: str, name: str, unit: str, repeats: int) -> None:
        self.component = component
        self.name = name
        self.unit = unit
        self.repeats = repeats
        self.rows: list[Row] = []
        self.targets: list[Target] = []
        self.skipped: list[tuple[str, str]] = []
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

    def row(self, implementation: str) -> Row | None:
        return next((r for r in self.rows if r.implementation == implementation), None)

    def execute(self) -> None:
        """Run every implementation ``repeats`` times, interleaved, then judge the targets."""
        for repeat in range(self.repeats):
            # Rotate the order each repeat so no implementation always runs first
            # (after an idle spell) or last (after the others warmed the caches).
            shift = repeat % len(self.rows) if self.rows else 0
            for row in self.rows[shift:] + self.rows[:shift]:
                work, setup = self._work[row.implementation]
                row.samples.append(_time_once(work, setup) / row.items)
        for row in self.rows:
            row.seconds_per_item = statistics.median(row.samples)
        for target in self.targets:
            fast, slow = self.row(target.faster), self.row(target.than)
            if fast is None or slow is None:
                continue
            if target.min_speedup is not None:
                target.measured = slow.seconds_per_item / fast.seconds_per_item
                target.met = target.measured >= target.min_speedup
            else:
                assert target.max_ratio is not None
                target.measured = fast.seconds_per_item / slow.seconds_per_item
                target.met = target.measured <= target.max_ratio


def _time_once(work: Callable[..., Any], setup: Callable[[], Any] | None) -> float:
    prepared = setup() if setup is not None else None
    gc.collect()
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

    def __init__(self, *, quick: bool = False, repeats: int | None = None) -> None:
        if repeats is not None and repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.quick = quick
        self.repeats = repeats if repeats is not None else (3 if quick else 5)
        self.cases: list[Case] = []
        self.notes: list[str] = []
        self._stack = contextlib.ExitStack()
        self._redis_url: str | None = None

    def case(self, component: str, name: str, *, unit: str = "item",
             repeats: int | None = None) -> Case:
        case = Case(component, name, unit, repeats or self.repeats)
        self.cases.append(case)
        return case

    def peer(self, module: str) -> ModuleType | None:
        """Import a comparison peer, or return None (the caller records the skip)."""
        try:
            return importlib.import_module(module)
        except ImportError:
            return None

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

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> BenchSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def discover_suites() -> list[ModuleType]:
    """Import every public submodule of ``buttress.bench`` that has ``register``."""
    import buttress.bench as package

    suites = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if callable(getattr(module, "register", None)):
            suites.append(module)
    return sorted(suites, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def run(
    *,
    quick: bool = False,
    only: list[str] | None = None,
    repeats: int | None = None,
    json_path: str | None = None,
    out: TextIO = sys.stdout,
) -> list[Case]:
    """Run the suites (all, or those named in ``only``) and print the table."""
    suites = discover_suites()
    names = {s.__name__.rsplit(".", 1)[1] for s in suites}
    if only:
        unknown = sorted(set(only) - names)
        if unknown:
            raise ValueError(f"unknown benchmark suite(s) {unknown}; known: {sorted(names)}")
        suites = [s for s in suites if s.__name__.rsplit(".", 1)[1] in only]
    with BenchSession(quick=quick, repeats=repeats) as session:
        for suite in suites:
            before = len(session.cases)
            started = time.perf_counter()
            suite.register(session)
            for case in session.cases[before:]:
                print(f"  running {case.component}: {case.name} ...", file=sys.stderr, flush=True)
                case.execute()
            logger.info("suite %s took %.1fs", suite.__name__, time.perf_counter() - started)
        print_table(session.cases, out=out)
        for note in session.notes:
            print(f"note: {note}", file=out)
        if json_path:
            write_json(session.cases, json_path, quick=quick)
        return session.cases


def _format_time(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"


def print_table(cases: list[Case], out: TextIO = sys.stdout) -> None:
    """Print one table: every case, every implementation, its ratio to buttress, the targets."""
    lines: list[tuple[str, str, str, str, str]] = []
    for case in cases:
        ours = case.row(OURS)
        for row in case.rows:
            if ours is None or row is ours:
                ratio = "1.00x" if row is ours else ""
            else:
                ratio = f"{row.seconds_per_item / ours.seconds_per_item:.2f}x"
            lines.append((
                f"{case.component}: {case.name}",
                row.implementation + (f" ({row.note})" if row.note else ""),
                f"{_format_time(row.seconds_per_item)}/{case.unit}",
                ratio,
                "",
            ))
        for impl, reason in case.skipped:
            lines.append((f"{case.component}: {case.name}", impl, "skipped", "", reason))
        for target in case.targets:
            if target.met is None:
                verdict = "not evaluated (an implementation was skipped)"
            else:
                figure = (f"{target.measured:.2f}x faster" if target.min_speedup is not None
                          else f"{target.measured:.2f}x the time")
                verdict = f"{'MET' if target.met else 'MISSED'}: {figure}"
            lines.append((f"{case.component}: {case.name}", "target", "", "",
                          f"{target.describe()}: {verdict}"))
    header = ("case", "implementation", "median time", "time vs buttress", "target")
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    print(fmt(header), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    previous = None
    for line in lines:
        shown = line if line[0] != previous else ("", *line[1:])
        previous = line[0]
        print(fmt(shown), file=out)
    missed = [t for c in cases for t in c.targets if t.met is False]
    met = [t for c in cases for t in c.targets if t.met]
    print(f"\ntargets: {len(met)} met, {len(missed)} missed", file=out)


def write_json(cases: list[Case], path: str, *, quick: bool) -> None:
    """Save the results with enough context to compare runs."""
    document = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": quick,
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "cases": [
            {
                "component": c.component,
                "name": c.name,
                "unit": c.unit,
                "rows": [asdict(r) for r in c.rows],
                "skipped": [{"implementation": i, "reason": r} for i, r in c.skipped],
                "targets": [asdict(t) for t in c.targets],
            }
            for c in cases
        ],
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(document, fh, indent=2, default=str)

