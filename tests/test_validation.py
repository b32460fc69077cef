"""One argument rule for every public constructor and entry point (docs/errors.md).

Wrong type -> TypeError; the right type with a wrong value -> ValueError;
``bool`` is never a number; numeric strings are not numbers (they are accepted
only from the environment or a command line); an argument that picks one of a
list of choices raises ValueError for anything not in the list, whatever its
type (``require_choice``: the message lists the choices).  The messages name
the argument.

``test_argument_rule`` is one table over the public API: a new constructor or
entry point adds its rows here.  ``test_every_exception_is_a_buttress_error``
walks every module and checks the one error hierarchy.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import buttress
from buttress.errors import ButtressError


@dataclass
class Context:
    """What a case may need: a Redis client, a scratch directory."""

    redis: Any
    redis_url: str
    tmp_path: Any


@dataclass
class Case:
    id: str
    error: type[Exception]
    call: Callable[[Context], Any]
    named: str = ""  # a word the message must contain (the argument's name)


def T(case_id: str, call: Callable[[Context], Any], named: str = "") -> Any:
    return pytest.param(Case(case_id, TypeError, call, named), id=case_id)


def V(case_id: str, call: Callable[[Context], Any], named: str = "") -> Any:
    return pytest.param(Case(case_id, ValueError, call, named), id=case_id)


def _scheduler(**kwargs: Any) -> Any:
    return buttress.TaskScheduler(**kwargs)


def _enqueue(*args: Any, **kwargs: Any) -> Any:
    with buttress.TaskScheduler(workers=1) as scheduler:
        return scheduler.enqueue(*args, **kwargs)


def _election(c: Context, **kwargs: Any) -> Any:
    kwargs.setdefault("ttl_ms", 1000)
    name = kwargs.pop("name", "validation")
    return buttress.LeaderElection(c.redis, name, **kwargs)


def _elector(c: Context, **kwargs: Any) -> Any:
    instance = kwargs.pop("instance_id", "a")
    return buttress.LeaderElector(_election(c), instance, **kwargs)


def _async_election(c: Context, **kwargs: Any) -> Any:
    import redis.asyncio

    kwargs.setdefault("ttl_ms", 1000)
    return buttress.AsyncLeaderElection(redis.asyncio.Redis.from_url(c.redis_url),
                                        "validation", **kwargs)


def _fair_queue(c: Context, **kwargs: Any) -> Any:
    from buttress.distributed import FairQueue

    name = kwargs.pop("name", "validation")
    return FairQueue(c.redis, name, **kwargs)


def _worker(c: Context, **kwargs: Any) -> Any:
    from buttress.distributed import Worker

    queue = kwargs.pop("queue", None) or _fair_queue(c)
    handlers = kwargs.pop("handlers", {"t": print})
    return Worker(queue, handlers, **kwargs)


def _dedupe(c: Context, **kwargs: Any) -> Any:
    handler = kwargs.pop("handler", lambda msg_id, payload: None)
    store = kwargs.pop("store", None) or buttress.SQLiteStore(str(c.tmp_path / "d.db"))
    return buttress.Deduplicator(handler, store, **kwargs)


def _sqlite(c: Context, **kwargs: Any) -> Any:
    path = kwargs.pop("path", str(c.tmp_path / "s.db"))
    return buttress.SQLiteStore(path, **kwargs)


def _add_cleanup(*args: Any, **kwargs: Any) -> Any:
    return buttress.GracefulShutdown().add_cleanup(*args, **kwargs)


def _bloom() -> Any:
    return buttress.BloomFilter.for_capacity(1000, 0.01)


CASES = [
    # --- Bloom filter
    T("BloomFilter num_bits='1024'", lambda c: buttress.BloomFilter("1024", 3), "num_bits"),
    T("BloomFilter num_bits=True", lambda c: buttress.BloomFilter(True, 3), "num_bits"),
    V("BloomFilter num_bits=0", lambda c: buttress.BloomFilter(0, 3), "num_bits"),
    T("BloomFilter num_hashes=1.5", lambda c: buttress.BloomFilter(1024, 1.5), "num_hashes"),
    V("BloomFilter num_hashes=0", lambda c: buttress.BloomFilter(1024, 0), "num_hashes"),
    V("BloomFilter layout=5", lambda c: buttress.BloomFilter(1024, 3, layout=5), "layout"),
    V("BloomFilter layout='nope'", lambda c: buttress.BloomFilter(1024, 3, layout="nope"),
      "layout"),
    T("for_capacity capacity='1000'", lambda c: buttress.BloomFilter.for_capacity("1000"),
      "capacity"),
    V("for_capacity capacity=0", lambda c: buttress.BloomFilter.for_capacity(0), "capacity"),
    T("for_capacity fp_rate='0.01'",
      lambda c: buttress.BloomFilter.for_capacity(1000, "0.01"), "fp_rate"),
    V("for_capacity fp_rate=1.5", lambda c: buttress.BloomFilter.for_capacity(1000, 1.5),
      "fp_rate"),
    T("BloomFilter.insert(3.5)", lambda c: _bloom().insert(3.5)),
    T("BloomFilter.open(path=5)", lambda c: buttress.BloomFilter.open(5), "path"),
    V("BloomFilter.open(mode='x')",
      lambda c: buttress.BloomFilter.open(str(c.tmp_path / "b.bloom"), "x"), "mode"),
    T("BloomGuard lookup=5", lambda c: buttress.BloomGuard(5, _bloom()), "lookup"),
    T("BloomGuard bloom='x'", lambda c: buttress.BloomGuard(dict().get, "x"), "bloom"),
    # --- scheduler
    T("TaskScheduler workers='5'", lambda c: _scheduler(workers="5"), "workers"),
    T("TaskScheduler workers=True", lambda c: _scheduler(workers=True), "workers"),
    V("TaskScheduler workers=0", lambda c: _scheduler(workers=0), "workers"),
    V("TaskScheduler high_water=0", lambda c: _scheduler(high_water=0), "high_water"),
    V("TaskScheduler low_water>high_water",
      lambda c: _scheduler(high_water=10, low_water=20), "low_water"),
    V("TaskScheduler overflow=5", lambda c: _scheduler(overflow=5), "overflow"),
    V("TaskScheduler overflow='nope'", lambda c: _scheduler(overflow="nope"), "overflow"),
    T("TaskScheduler block_timeout='1'", lambda c: _scheduler(block_timeout="1"),
      "block_timeout"),
    V("TaskScheduler block_timeout=-1", lambda c: _scheduler(block_timeout=-1),
      "block_timeout"),
    T("TaskScheduler on_state_change=5", lambda c: _scheduler(on_state_change=5),
      "on_state_change"),
    T("TaskScheduler name=5", lambda c: _scheduler(name=5), "name"),
    T("enqueue(5)", lambda c: _enqueue(5), "task"),
    T("enqueue deadline='soon'", lambda c: _enqueue(print, deadline="soon"), "deadline"),
    V("enqueue deadline=nan", lambda c: _enqueue(print, deadline=float("nan")), "deadline"),
    T("PriorityDeque.push priority='1'", lambda c: buttress.PriorityDeque().push("x", "1"),
      "priority"),
    # --- dedupe
    T("Deduplicator handler=5", lambda c: _dedupe(c, handler=5), "handler"),
    T("Deduplicator store=5", lambda c: _dedupe(c, store=5), "store"),
    T("Deduplicator ttl='5'", lambda c: _dedupe(c, ttl="5"), "ttl"),
    T("Deduplicator ttl=True", lambda c: _dedupe(c, ttl=True), "ttl"),
    V("Deduplicator ttl=0", lambda c: _dedupe(c, ttl=0), "ttl"),
    V("Deduplicator ttl past ten years (Redis refuses it)", lambda c: _dedupe(c, ttl=1e17),
      "ttl"),
    V("Deduplicator mode=5", lambda c: _dedupe(c, mode=5), "mode"),
    V("Deduplicator mode='nope'", lambda c: _dedupe(c, mode="nope"), "mode"),
    V("Deduplicator lease=-1", lambda c: _dedupe(c, lease=-1), "lease"),
    T("Deduplicator release_on_failure='yes'", lambda c: _dedupe(c, release_on_failure="yes"),
      "release_on_failure"),
    T("Deduplicator.process_batch(5)", lambda c: _dedupe(c).process_batch(5), "messages"),
    T("Deduplicator.process_message(msg_id=5)", lambda c: _dedupe(c).process_message(5, b""),
      "msg_id"),
    T("SQLiteStore path=5", lambda c: _sqlite(c, path=5), "path"),
    T("SQLiteStore table=5", lambda c: _sqlite(c, table=5), "table"),
    V("SQLiteStore table='x; drop'", lambda c: _sqlite(c, table="x; drop"), "table"),
    T("SQLiteStore busy_timeout='5'", lambda c: _sqlite(c, busy_timeout="5"), "busy_timeout"),
    V("SQLiteStore busy_timeout=-1", lambda c: _sqlite(c, busy_timeout=-1), "busy_timeout"),
    T("SQLiteStore lock_retries=1.5", lambda c: _sqlite(c, lock_retries=1.5), "lock_retries"),
    V("SQLiteStore lock_retries=-1", lambda c: _sqlite(c, lock_retries=-1), "lock_retries"),
    V("SQLiteStore sweep_every=0", lambda c: _sqlite(c, sweep_every=0), "sweep_every"),
    V("SQLiteStore sweep_batch=0", lambda c: _sqlite(c, sweep_batch=0), "sweep_batch"),
    V("SQLiteStore synchronous='BOGUS'", lambda c: _sqlite(c, synchronous="BOGUS"),
      "synchronous"),
    T("RedisStore client='redis://'", lambda c: buttress.RedisStore("redis://"), "client"),
    T("RedisStore namespace=5", lambda c: buttress.RedisStore(c.redis, namespace=5),
      "namespace"),
    V("RedisStore namespace=''", lambda c: buttress.RedisStore(c.redis, namespace=""),
      "namespace"),
    T("RedisStore partitions='2'", lambda c: buttress.RedisStore(c.redis, partitions="2"),
      "partitions"),
    V("RedisStore partitions=0", lambda c: buttress.RedisStore(c.redis, partitions=0),
      "partitions"),
    # --- leader election
    T("LeaderElection redis_client=5",
      lambda c: buttress.LeaderElection(5, "x", ttl_ms=1000), "redis_client"),
    T("LeaderElection name=5", lambda c: _election(c, name=5), "name"),
    V("LeaderElection name=''", lambda c: _election(c, name=""), "name"),
    T("LeaderElection ttl_ms='5'", lambda c: _election(c, ttl_ms="5"), "ttl_ms"),
    T("LeaderElection ttl_ms=True", lambda c: _election(c, ttl_ms=True), "ttl_ms"),
    V("LeaderElection ttl_ms=0", lambda c: _election(c, ttl_ms=0), "ttl_ms"),
    V("LeaderElection ttl_ms past ten years", lambda c: _election(c, ttl_ms=10**20),
      "ttl_ms"),
    V("LeaderElection drift_ms=-1", lambda c: _election(c, drift_ms=-1), "drift_ms"),
    T("LeaderElection prefix=5", lambda c: _election(c, prefix=5), "prefix"),
    T("LeaderElector election=5", lambda c: buttress.LeaderElector(5, "a"), "election"),
    T("LeaderElector instance_id=5", lambda c: _elector(c, instance_id=5), "instance_id"),
    V("LeaderElector instance_id=''", lambda c: _elector(c, instance_id=""), "instance_id"),
    T("LeaderElector on_elected=5", lambda c: _elector(c, on_elected=5), "on_elected"),
    T("LeaderElector renew_interval_ms='5'", lambda c: _elector(c, renew_interval_ms="5"),
      "renew_interval_ms"),
    V("LeaderElector renew_interval_ms=0", lambda c: _elector(c, renew_interval_ms=0),
      "renew_interval_ms"),
    T("LeaderElector seed='1'", lambda c: _elector(c, seed="1"), "seed"),
    T("FencedStore resource=5", lambda c: buttress.FencedStore(c.redis, 5), "resource"),
    V("FencedStore resource=''", lambda c: buttress.FencedStore(c.redis, ""), "resource"),
    T("FencedStore.write fencing_token='1'",
      lambda c: buttress.FencedStore(c.redis, "r").write("1", "f", "v"), "fencing_token"),
    T("AsyncLeaderElection ttl_ms='5'", lambda c: _async_election(c, ttl_ms="5"), "ttl_ms"),
    V("AsyncLeaderElection ttl_ms=0", lambda c: _async_election(c, ttl_ms=0), "ttl_ms"),
    V("AsyncLeaderElection ttl_ms past ten years",
      lambda c: _async_election(c, ttl_ms=10**20), "ttl_ms"),
    # --- distributed fair queue
    T("FairQueue name=5", lambda c: _fair_queue(c, name=5), "name"),
    V("FairQueue name=''", lambda c: _fair_queue(c, name=""), "name"),
    T("FairQueue high_water='10'", lambda c: _fair_queue(c, high_water="10"), "high_water"),
    V("FairQueue high_water=0", lambda c: _fair_queue(c, high_water=0), "high_water"),
    T("FairQueue lease_ms=1.5", lambda c: _fair_queue(c, lease_ms=1.5), "lease_ms"),
    V("FairQueue lease_ms=0", lambda c: _fair_queue(c, lease_ms=0), "lease_ms"),
    T("FairQueue weights={'a': '1'}", lambda c: _fair_queue(c, weights={"a": "1"}), "weights"),
    V("FairQueue weights={'a': -1}", lambda c: _fair_queue(c, weights={"a": -1}), "weights"),
    T("FairQueue shed_below='1'", lambda c: _fair_queue(c, shed_below="1"), "shed_below"),
    V("FairQueue max_attempts=0", lambda c: _fair_queue(c, max_attempts=0), "max_attempts"),
    V("FairQueue retry_delay_ms=-1", lambda c: _fair_queue(c, retry_delay_ms=-1),
      "retry_delay_ms"),
    V("FairQueue completion_log=-1", lambda c: _fair_queue(c, completion_log=-1),
      "completion_log"),
    T("FairQueue.enqueue task_name=5",
      lambda c: _fair_queue(c).enqueue(5, {}, tenant="t"), "task_name"),
    T("FairQueue.enqueue tenant=5", lambda c: _fair_queue(c).enqueue("t", {}, tenant=5),
      "tenant"),
    V("FairQueue.enqueue tenant=''", lambda c: _fair_queue(c).enqueue("t", {}, tenant=""),
      "tenant"),
    T("FairQueue.enqueue priority='1'",
      lambda c: _fair_queue(c).enqueue("t", {}, tenant="a", priority="1"), "priority"),
    T("Worker queue=5", lambda c: _worker(c, queue=5), "queue"),
    T("Worker handlers=5", lambda c: _worker(c, handlers=5), "handlers"),
    T("Worker handlers={'t': 5}", lambda c: _worker(c, handlers={"t": 5}), "handlers"),
    T("Worker concurrency='2'", lambda c: _worker(c, concurrency="2"), "concurrency"),
    V("Worker concurrency=0", lambda c: _worker(c, concurrency=0), "concurrency"),
    V("Worker prefetch=0", lambda c: _worker(c, prefetch=0), "prefetch"),
    V("Worker idle_wait=-1", lambda c: _worker(c, idle_wait=-1), "idle_wait"),
    T("load_handlers(5)",
      lambda c: importlib.import_module("buttress.distributed").load_handlers(5)),
    V("load_handlers('no colon')",
      lambda c: importlib.import_module("buttress.distributed").load_handlers("nocolon")),
    # --- graceful shutdown
    T("GracefulShutdown budget=5", lambda c: buttress.GracefulShutdown(5), "budget"),
    T("GracefulShutdown drain_timeout_exit_code='3'",
      lambda c: buttress.GracefulShutdown(drain_timeout_exit_code="3"),
      "drain_timeout_exit_code"),
    V("GracefulShutdown drain_timeout_exit_code=300",
      lambda c: buttress.GracefulShutdown(drain_timeout_exit_code=300),
      "drain_timeout_exit_code"),
    T("GracefulShutdown force_signals=5", lambda c: buttress.GracefulShutdown(force_signals=5),
      "force_signals"),
    T("ShutdownBudget drain_delay='5'", lambda c: buttress.ShutdownBudget(drain_delay="5"),
      "drain_delay"),
    T("ShutdownBudget drain_timeout=True",
      lambda c: buttress.ShutdownBudget(drain_timeout=True), "drain_timeout"),
    V("ShutdownBudget drain_delay=-1", lambda c: buttress.ShutdownBudget(drain_delay=-1),
      "drain_delay"),
    T("add_cleanup(5)", lambda c: _add_cleanup(5), "hook"),
    T("add_cleanup name=5", lambda c: _add_cleanup(print, name=5), "name"),
    V("add_cleanup timeout=-1", lambda c: _add_cleanup(print, timeout=-1), "timeout"),
]

# serve_* would serve forever if they accepted a bad argument: each runs in a
# subprocess with a deadline instead of in the test process.
SERVE_CASES = [
    ("serve_wsgi app=5", TypeError, "serve_wsgi(5, port=0, handle_signals=False)", "app"),
    ("serve_wsgi port='8000'", TypeError, "serve_wsgi(APP, port='8000', handle_signals=False)",
     "port"),
    ("serve_wsgi port=70000", ValueError, "serve_wsgi(APP, port=70000, handle_signals=False)",
     "port"),
    ("serve_wsgi host=5", TypeError, "serve_wsgi(APP, host=5, port=0, handle_signals=False)",
     "host"),
    ("serve_wsgi handle_signals='yes'", TypeError,
     "serve_wsgi(APP, port=0, handle_signals='yes')", "handle_signals"),
    ("serve_wsgi controller=5", TypeError,
     "serve_wsgi(APP, port=0, controller=5, handle_signals=False)", "controller"),
    ("serve_asgi app=5", TypeError, "serve_asgi(5, port=0, handle_signals=False)", "app"),
    ("serve_asgi port=-1", ValueError, "serve_asgi(ASGI, port=-1, handle_signals=False)",
     "port"),
]


def _close(obj: Any) -> None:
    for method in ("close", "shutdown", "stop"):
        function = getattr(obj, method, None)
        if callable(function) and not inspect.iscoroutinefunction(function):
            with contextlib.suppress(Exception):  # best effort: the case already failed
                function()
            return


@pytest.fixture
def context(redis_client: Any, redis_url: str, tmp_path: Any) -> Iterator[Context]:
    yield Context(redis_client, redis_url, tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_argument_rule(case: Case, context: Context) -> None:
    with pytest.raises(case.error) as caught:
        _close(case.call(context))
    if case.named:
        assert case.named in str(caught.value), (
            f"the message should name the argument {case.named!r}: {caught.value}")


SERVE = textwrap.dedent("""
    import sys
    from buttress import serve_asgi, serve_wsgi

    def APP(environ, start_response):
        start_response("200 OK", [])
        return [b""]

    async def ASGI(scope, receive, send):
        pass

    try:
        {call}
    except Exception as exc:
        print(type(exc).__name__ + ": " + str(exc))
        sys.exit(0)
    print("returned without an error")
""")


@pytest.mark.parametrize(("error", "call", "named"),
                         [pytest.param(e, c, n, id=i) for i, e, c, n in SERVE_CASES])
def test_argument_rule_of_servers(error: type[Exception], call: str, named: str) -> None:
    try:
        done = subprocess.run([sys.executable, "-c", SERVE.format(call=call)], text=True,
                              capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{call} started serving instead of raising {error.__name__}")
    outcome = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    assert outcome.startswith(error.__name__ + ":"), outcome
    assert named in outcome, f"the message should name the argument {named!r}: {outcome}"


def _buttress_modules() -> list[str]:
    names = ["buttress"]
    for info in pkgutil.walk_packages(buttress.__path__, "buttress."):
        names.append(info.name)
    return sorted(names)


def test_every_exception_is_a_buttress_error() -> None:
    """Every exception class defined in buttress derives from ButtressError."""
    found, strays = [], []
    for name in _buttress_modules():
        if name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (issubclass(obj, BaseException) and obj.__module__ == module.__name__
                    and obj.__module__.startswith("buttress")):
                found.append(obj)
                if not issubclass(obj, ButtressError):
                    strays.append(f"{obj.__module__}.{obj.__qualname__}")
    assert found, "no exception classes found: the walk is broken"
    assert not strays, f"exceptions outside the ButtressError hierarchy: {strays}"


def test_public_errors_are_reexported() -> None:
    from buttress import errors

    for name in errors.__all__:
        assert getattr(buttress, name) is getattr(errors, name)
        assert name in buttress.__all__
