"""Distributed suite: no-op tasks through Redis with 4 worker processes, against peers.

Every implementation gets 4 worker processes on the same Redis, and is
measured the same way:

* *drain*: with the workers paused (SIGSTOP), the producer enqueues N no-op
  tasks (untimed); the clock runs from SIGCONT until the N tasks are done.
* *enqueue*: one producer enqueues N tasks, one call per task (workers paused).

"Done" for a peer is "its no-op function ran" (counted in the worker process,
in shared memory); for buttress it is "acknowledged in Redis" (the queue's own
``completed`` counter), which is stricter.  Peers, each in its fastest
configuration that still runs every task, results off:

* ``rq SimpleWorker``: RQ's default Worker forks a work horse per job; the
  SimpleWorker runs jobs in-process and is much faster.
* ``huey PriorityRedisHuey``: a sorted set (BZPOPMIN), one thread consumer.
* ``celery solo x16``: Celery with its Redis broker, the solo pool (no
  child processes), prefetch multiplier 16, gossip/mingle/heartbeat off.
* ``dramatiq 8 threads``: Dramatiq's RedisBroker, one worker with 8 threads.
* asyncio peers: ``taskiq ListQueueBroker`` (taskiq-redis, 100 async tasks per
  process), ``saq concurrency=10`` and ``arq max_jobs=10`` (poll delay 50 ms,
  no results kept).  taskiq and SAQ run with the socket timeout off: with
  redis-py 8's default of 5 s, a worker process paused (SIGSTOP, as the drain
  method does) while its blocking pop was answered resumes into a timeout and
  loses the message it had popped, so the drain never completes.  buttress
  keeps the default: its workers resend the lease call with the same request id
  and get the same tasks back.

Ours: ``buttress`` is a FairQueue with 3 tenants (tasks spread round robin) and
one Worker per process with default settings (prefetch 1: a worker holds one
lease at a time, and acknowledges it with its next lease call, so one round trip
per task); the sync targets are judged on it.  ``buttress prefetch=8`` leases 8
tasks per round trip, to show what batching buys.  ``buttress async`` is an
AsyncWorker per process with 8 in-flight coroutines (prefetch 1), judged
against the asyncio peers (which keep 10 to 100 tasks in flight per process).

Two more cases put the cost of the resend records (request ids, ``req:<id>``) in
numbers: drain and enqueue of today's queue against the queue from before issue
11 (``buttress before #11``: ``distributed.py`` of the tree that
``BUTTRESS_BENCH_OLD_SRC`` names, e.g. ``git archive 4ea162d src``, loaded beside
today's package), on the same Redis, with ``buttress again`` as the noise floor;
the target is at most 1.10x the time.  Without the variable they are not
evaluated.

A peer that is not installed is skipped as such; one that is installed but
fails to import is skipped with its import error (taskiq-redis 1.0 on taskiq
0.13 did that), one that cannot connect with its error.

Round trips are counted on the client side by a redis-py connection class that
counts requests sent (a pipeline or a script call is one), for the libraries
that take a redis-py client (buttress, RQ, huey); worker processes publish their
counts through a shared memory-mapped file.  Run a worker process by hand with
``python -m buttress.bench.distributed IMPL URL QUEUE COUNTER_FILE SLOT``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from buttress.bench import BenchSession
from buttress.bench._child import OLD_SRC_ENV, child_env

ORDER = 60

WORKERS = 4
OURS = "buttress"
OURS_PREFETCH = "buttress prefetch=8"
OURS_ASYNC = "buttress async concurrency=8"
RQ = "rq SimpleWorker"
HUEY = "huey PriorityRedisHuey"
CELERY = "celery solo x16"
DRAMATIQ = "dramatiq 8 threads"
TASKIQ = "taskiq ListQueueBroker"
SAQ = "saq concurrency=10"
ARQ = "arq max_jobs=10"
# The resend records' cost: the same worker and producer before issue 11 (no request ids).
OURS_AGAIN = "buttress again"
BEFORE = "buttress before #11"
SYNC_PEERS = (RQ, HUEY, CELERY, DRAMATIQ)
ASYNC_PEERS = (TASKIQ, SAQ, ARQ)
TENANTS = ("tenant-a", "tenant-b", "tenant-c")

# In a worker process: where the no-op tasks count themselves (set by _serve).
_DONE: tuple[RoundTrips, int] | None = None
_DONE_LOCK = threading.Lock()  # Dramatiq runs tasks on 8 threads


def noop(*args: Any, **kwargs: Any) -> None:
    """The task every implementation runs (RQ imports it by name)."""
    if _DONE is not None:
        with _DONE_LOCK:
            _DONE[0].add_done(_DONE[1])


async def async_noop(*args: Any, **kwargs: Any) -> None:
    """The coroutine every asyncio implementation runs."""
    noop()


# --------------------------------------------------------------------------- round trips


class RoundTrips:
    """Request counters: one slot per process in a shared memory-mapped file."""

    SLOT = 24  # bytes: request count, ready flag, tasks done

    def __init__(self, path: str, slots: int) -> None:
        self.path = path
        if not os.path.exists(path) or os.path.getsize(path) < slots * self.SLOT:
            with open(path, "wb") as fh:
                fh.write(b"\0" * slots * self.SLOT)
        self._fh = open(path, "r+b")  # noqa: SIM115 - lives as long as the map
        self._map = mmap.mmap(self._fh.fileno(), slots * self.SLOT)
        self.slots = slots

    def add(self, slot: int, n: int = 1) -> None:
        offset = slot * self.SLOT
        (count,) = struct.unpack_from("<Q", self._map, offset)
        struct.pack_into("<Q", self._map, offset, count + n)  # one writer per slot

    def count(self, slot: int) -> int:
        return int(struct.unpack_from("<Q", self._map, slot * self.SLOT)[0])

    def total(self, slots: range) -> int:
        return sum(self.count(s) for s in slots)

    def add_done(self, slot: int) -> None:
        offset = slot * self.SLOT + 16
        (count,) = struct.unpack_from("<Q", self._map, offset)
        struct.pack_into("<Q", self._map, offset, count + 1)

    def done(self, slots: range) -> int:
        return sum(int(struct.unpack_from("<Q", self._map, s * self.SLOT + 16)[0])
                   for s in slots)

    def set_ready(self, slot: int) -> None:
        struct.pack_into("<Q", self._map, slot * self.SLOT + 8, 1)

    def ready(self, slot: int) -> bool:
        return bool(struct.unpack_from("<Q", self._map, slot * self.SLOT + 8)[0])

    def close(self) -> None:
        self._map.close()
        self._fh.close()


def counting_client(url: str, counters: RoundTrips, slot: int) -> Any:
    """A redis-py client whose every request (command, pipeline, script call) is counted."""
    import redis

    class CountingConnection(redis.Connection):
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            counters.add(slot)
            super().send_packed_command(command, check_health)

    pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    return redis.Redis(connection_pool=pool)


def counting_async_client(url: str, counters: RoundTrips, slot: int) -> Any:
    """:func:`counting_client` for ``redis.asyncio``."""
    import redis.asyncio

    class CountingConnection(redis.asyncio.Connection):
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            counters.add(slot)
            await super().send_packed_command(command, check_health)

    pool = redis.asyncio.ConnectionPool.from_url(url, connection_class=CountingConnection)
    return redis.asyncio.Redis(connection_pool=pool)


# --------------------------------------------------------------------------- implementations


def make_huey(client: Any, queue: str) -> tuple[Any, Any]:
    from huey import PriorityRedisHuey

    huey = PriorityRedisHuey(queue, connection_pool=client.connection_pool, results=False)
    return huey, huey.task(name="noop")(noop)


def make_celery(url: str, queue: str) -> tuple[Any, Any]:
    from celery import Celery

    app = Celery("buttress_bench", broker=url, set_as_current=False)
    app.conf.update(task_ignore_result=True, task_default_queue=queue,
                    worker_prefetch_multiplier=16, worker_hijack_root_logger=False,
                    broker_connection_retry_on_startup=True, worker_send_task_events=False)
    return app, app.task(name="noop", ignore_result=True)(noop)


def make_dramatiq(url: str, queue: str) -> tuple[Any, Any]:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=url)
    actor = dramatiq.actor(actor_name="noop", queue_name=queue, broker=broker,
                           max_retries=0)(noop)
    return broker, actor


def make_taskiq(url: str, queue: str) -> tuple[Any, Any]:
    from taskiq_redis import ListQueueBroker

    # No socket timeout: with redis-py 8's default (5 s), a worker paused while its
    # BRPOP was answered loses that message when it resumes (see the docstring).
    broker = ListQueueBroker(url, queue_name=queue, socket_timeout=None)
    return broker, broker.task(task_name="noop")(async_noop)


def make_saq(url: str, queue: str) -> Any:
    import redis.asyncio
    from saq.queue.redis import RedisQueue

    # No socket timeout, as for taskiq above.
    return RedisQueue(redis.asyncio.Redis.from_url(url, socket_timeout=None), name=queue)


async def saq_noop(ctx: Any, **kwargs: Any) -> None:
    noop()


async def arq_noop(ctx: Any, *args: Any) -> None:
    noop()


class Implementation:
    """One queue library: its producer, its worker processes, its completion counter."""

    label = ""
    counts_round_trips = True

    def __init__(self, url: str, queue: str, counters: RoundTrips, first_slot: int) -> None:
        import redis

        self.url = url
        self.queue = queue
        self.counters = counters
        self.producer_slot = first_slot
        self.worker_slots = range(first_slot + 1, first_slot + 1 + WORKERS)
        self.producer = counting_client(url, counters, self.producer_slot)
        # Uncounted: polls for completion.  Any: redis-py's stubs differ between 5.x and 8.x.
        self.observer: Any = redis.Redis.from_url(url)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.enqueue_rt: list[float] = []
        self.drain_rt: list[float] = []

    # -- the parts a library fills in

    def enqueue(self, i: int) -> None:
        raise NotImplementedError

    def enqueue_many(self, n: int) -> None:
        """Enqueue tasks 0..n-1, one call each (asyncio producers override: one loop run)."""
        for i in range(n):
            self.enqueue(i)

    def completed(self) -> int:
        """Tasks done so far (monotonic): the worker processes' own counts."""
        return self.counters.done(self.worker_slots)

    def clear(self) -> None:
        """Empty the queue (after warm-up; the done counters keep counting)."""

    # -- the shared measurement

    def start(self) -> None:
        if self.processes:
            return
        env = child_env()  # the workers import this same buttress, installed or not
        for slot in self.worker_slots:
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "buttress.bench.distributed", self.label, self.url,
                 self.queue, self.counters.path, str(slot)],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent))
        _wait(lambda: all(self.counters.ready(s) for s in self.worker_slots)
              or any(p.poll() is not None for p in self.processes), 60,
              f"{self.label} workers to start")
        failed = [p.returncode for p in self.processes if p.poll() is not None]
        if failed:
            self.close()
            raise RuntimeError(f"{self.label} worker processes exited with {failed}")
        self.clear()
        # Warm up: every worker reaches its loop, scripts are loaded, connections open.
        start = self.completed()
        self.enqueue_many(50)
        _wait(lambda: self.completed() >= start + 50, 60, f"{self.label} warm-up")

    def pause(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGSTOP)
        # SIGSTOP takes effect asynchronously: wait until every process is really stopped.
        _wait(lambda: all(process_stopped(p.pid) for p in self.processes), 10,
              f"{self.label} workers to stop")

    def resume(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGCONT)

    def prepare_enqueue(self) -> None:
        self.start()
        self.pause()
        self.clear()

    def timed_enqueue(self, n: int) -> None:
        before = self.counters.count(self.producer_slot)
        self.enqueue_many(n)
        self.enqueue_rt.append((self.counters.count(self.producer_slot) - before) / n)

    def prepare_drain(self, n: int) -> int:
        """Enqueue ``n`` tasks with the workers paused; return the completion count to reach."""
        self.prepare_enqueue()
        target = self.completed() + n  # counted before enqueueing, so it is always reachable
        self.enqueue_many(n)
        return target

    def timed_drain(self, target: int) -> None:
        before = self.counters.total(self.worker_slots)
        self.resume()
        _wait(lambda: self.completed() >= target, 120,
              lambda: f"{self.label} drain: {self.completed()} of {target} done", interval=0.001)
        self.drain_rt.append(self.counters.total(self.worker_slots) - before)

    def close(self) -> None:
        self.resume()
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []


class Buttress(Implementation):
    label = OURS
    prefetch = 1

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.fair = self.module().FairQueue(self.producer, self.queue, high_water=10**9,
                                            low_water=10**9 - 1)
        self.meta = self.fair.prefix + "meta"

    @staticmethod
    def module() -> ModuleType:
        """Where FairQueue and Worker come from (the producer's and the worker processes')."""
        import buttress.distributed

        return buttress.distributed

    def enqueue(self, i: int) -> None:
        self.fair.enqueue("noop", i, tenant=TENANTS[i % 3])

    def completed(self) -> int:
        return int(self.observer.hget(self.meta, "completed") or 0)

    def clear(self) -> None:
        keys = list(self.observer.scan_iter(match=self.fair.prefix.replace("{", "[{]") + "*"))
        keys = [k for k in keys if not k.endswith(b":meta")]  # keep the completed counter
        if keys:
            self.observer.delete(*keys)
        self.observer.hset(self.meta, mapping={"depth": 0, "state": "normal"})


class ButtressPrefetch(Buttress):
    """Each worker leases 8 tasks per round trip (and acks them with the next one)."""

    label = OURS_PREFETCH
    prefetch = 8


class ButtressBefore(Buttress):
    """The queue before issue 11 (no request ids, no resend records), same settings."""

    label = BEFORE

    @staticmethod
    def module() -> ModuleType:
        return old_distributed()


def old_distributed() -> ModuleType:
    """``buttress/distributed.py`` of the tree ``BUTTRESS_BENCH_OLD_SRC`` names (before #11).

    It is loaded under its own module name beside today's package (it imports only
    ``buttress._validate.require_int`` and ``buttress.errors``, which kept their API), so
    one process and one Redis time both.
    """
    name = "buttress_before_11_distributed"
    if name in sys.modules:
        return sys.modules[name]
    src = os.environ.get(OLD_SRC_ENV, "")
    path = os.path.join(src, "buttress", "distributed.py")
    if not src or not os.path.isfile(path):
        raise FileNotFoundError(
            f"{OLD_SRC_ENV}={src!r} has no buttress/distributed.py: give the src/ of a checkout "
            "from before issue 11 (git -C REPO archive 4ea162d src | tar -x -C DIR)")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class ButtressAsync(Buttress):
    """An AsyncWorker per process, 8 coroutines in flight (fed by the same sync producer)."""

    label = OURS_ASYNC
    concurrency = 8


class Rq(Implementation):
    label = RQ

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from rq import Queue

        self.rq_queue = Queue(self.queue, connection=self.producer)

    def enqueue(self, i: int) -> None:
        self.rq_queue.enqueue(noop, i)

    def clear(self) -> None:
        self.rq_queue.empty()


class Huey(Implementation):
    label = HUEY

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.huey, self.task = make_huey(self.producer, self.queue)

    def enqueue(self, i: int) -> None:
        self.task(i)

    def clear(self) -> None:
        self.huey.storage.flush_queue()


class CeleryPeer(Implementation):
    label = CELERY
    counts_round_trips = False  # kombu keeps its own connections

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.app, self.task = make_celery(self.url, self.queue)
        # Open the broker channel now, so a kombu that cannot use the installed redis-py
        # fails here and the peer is skipped with the reason, not the whole run mid-case
        # (kombu's Redis transport needs redis-py >= 6.1; arq and taskiq-redis pin < 6).
        with self.app.connection_for_write() as connection:
            connection.default_channel  # noqa: B018 (opening it is the check)

    def enqueue(self, i: int) -> None:
        self.task.apply_async((i,), queue=self.queue)

    def clear(self) -> None:
        self.observer.delete(self.queue)


class DramatiqPeer(Implementation):
    label = DRAMATIQ
    counts_round_trips = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.broker, self.actor = make_dramatiq(self.url, self.queue)

    def enqueue(self, i: int) -> None:
        self.actor.send(i)

    def clear(self) -> None:
        self.broker.flush(self.queue)


class AsyncPeer(Implementation):
    """A peer whose producer is a coroutine API: one event loop, one run per batch."""

    counts_round_trips = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.connect())

    async def connect(self) -> None:
        raise NotImplementedError

    async def enqueue_async(self, i: int) -> None:
        raise NotImplementedError

    def enqueue_many(self, n: int) -> None:
        async def produce() -> None:
            for i in range(n):
                await self.enqueue_async(i)
        self.loop.run_until_complete(produce())

    def close(self) -> None:
        super().close()
        if not self.loop.is_closed():
            self.loop.close()


class TaskiqPeer(AsyncPeer):
    label = TASKIQ

    async def connect(self) -> None:
        self.broker, self.task = make_taskiq(self.url, self.queue)
        await self.broker.startup()

    async def enqueue_async(self, i: int) -> None:
        await self.task.kiq(i)

    def clear(self) -> None:
        self.observer.delete(self.queue)


class SaqPeer(AsyncPeer):
    label = SAQ

    async def connect(self) -> None:
        self.saq_queue = make_saq(self.url, self.queue)
        await self.saq_queue.connect()

    async def enqueue_async(self, i: int) -> None:
        await self.saq_queue.enqueue("noop", i=i)


class ArqPeer(AsyncPeer):
    label = ARQ

    async def connect(self) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings

        self.pool = await create_pool(RedisSettings.from_dsn(self.url))

    async def enqueue_async(self, i: int) -> None:
        await self.pool.enqueue_job("noop", i, _queue_name=self.queue)


IMPLEMENTATIONS: dict[str, type[Implementation]] = {
    OURS: Buttress, OURS_PREFETCH: ButtressPrefetch, OURS_ASYNC: ButtressAsync, RQ: Rq,
    HUEY: Huey, CELERY: CeleryPeer, DRAMATIQ: DramatiqPeer, TASKIQ: TaskiqPeer, SAQ: SaqPeer,
    ARQ: ArqPeer, BEFORE: ButtressBefore}
PEER_MODULES = {RQ: "rq", HUEY: "huey", CELERY: "celery", DRAMATIQ: "dramatiq",
                TASKIQ: "taskiq_redis", SAQ: "saq", ARQ: "arq"}


# --------------------------------------------------------------------------- the suite


def register(session: BenchSession) -> None:
    n = 1_000 if session.quick else 10_000
    url = session.redis_url()
    counters = RoundTrips(tempfile.mkstemp(prefix="buttress-bench-rt-")[1],
                          slots=len(IMPLEMENTATIONS) * (WORKERS + 1))
    impls: list[Implementation] = []
    skipped: list[tuple[str, str]] = []
    for index, (label, cls) in enumerate(IMPLEMENTATIONS.items()):
        module = PEER_MODULES.get(label)
        problem = session.peer_problem(module) if module else None
        if label == BEFORE and not os.environ.get(OLD_SRC_ENV):
            problem = (f"set {OLD_SRC_ENV} to the src/ of a checkout from before issue 11 "
                       "(git archive 4ea162d src)")
        if problem:
            skipped.append((label, problem))
            continue
        queue = "bench-" + "".join(c if c.isalnum() else "-" for c in label) + f"-{os.getpid()}"
        try:
            impls.append(cls(url, queue, counters, index * (WORKERS + 1)))
        except Exception as exc:  # a peer that cannot even connect is skipped, and said so
            skipped.append((label, f"{type(exc).__name__}: {exc}"))

    drain = session.case("distributed", f"drain {n:,} no-op tasks, {WORKERS} worker processes",
                         unit="task")
    enqueue = session.case("distributed", f"enqueue {n:,} tasks, one producer", unit="task")
    by_label = {impl.label: impl for impl in impls}
    for impl in impls:
        if impl.label == BEFORE:
            continue  # not a peer: the resend-cost cases below
        drain.add(impl.label, _drain_work(impl, drain), items=n,
                  setup=functools.partial(impl.prepare_drain, n))
        if impl.label not in (OURS_PREFETCH, OURS_ASYNC):  # same producer as "buttress"
            enqueue.add(impl.label, _enqueue_work(impl, enqueue, n), items=n,
                        setup=impl.prepare_enqueue)
    # Stop the workers before the session stops its Redis.
    for impl in impls:
        session.on_close(impl.close)
    for case in (drain, enqueue):
        for label, reason in skipped:
            if label != BEFORE:
                case.skip(label, reason)
    _resend_cost(session, n, by_label, dict(skipped))
    # The promise is worker throughput.  Enqueue is reported without a target: huey's
    # is one ZADD, ours one script that also does admission and fairness bookkeeping.
    for peer in SYNC_PEERS:
        drain.target(OURS, peer, min_speedup=1.0)
    for peer in ASYNC_PEERS:
        drain.target(OURS_ASYNC, peer, min_speedup=1.5)
    session.notes.append(
        "distributed: peers run in their fastest configuration that runs every task, results "
        "off: RQ SimpleWorker (no fork per job), huey PriorityRedisHuey with a thread "
        "consumer, Celery solo pool with prefetch x16, Dramatiq with 8 threads, taskiq "
        "ListQueueBroker, SAQ concurrency 10, arq max_jobs 10 (poll delay 50 ms). A peer's "
        "task is done when its function ran; ours when its ack reached Redis. RT = Redis "
        "round trips (requests; a pipeline or script call is one), counted on the client "
        "side where the library takes a redis-py client. Enqueue has no target: huey's is "
        "one ZADD, ours a script that also does admission, fairness bookkeeping and the "
        "resend record.")


def _resend_cost(session: BenchSession, n: int, impls: dict[str, Implementation],
                 skipped: dict[str, str]) -> None:
    """The resend records' cost: today's queue against itself before issue 11, same Redis.

    The issue's promise: request ids and resend records (``req:<id>``) cost at most
    10% on drain and enqueue.  ``buttress again`` runs today's queue a second time
    (the same workers and producer): its ratio to ``buttress`` is the run's noise
    floor.  Without ``BUTTRESS_BENCH_OLD_SRC`` the old side is skipped and the
    targets are not evaluated.
    """
    ours = impls.get(OURS)
    if ours is None:
        return
    repeats = 11 if session.quick else 7  # many rounds, three sides: the medians settle
    drain = session.case("distributed", f"resend records' cost: drain {n:,} tasks, "
                         f"{WORKERS} worker processes", unit="task", repeats=repeats)
    enqueue = session.case("distributed", f"resend records' cost: enqueue {n:,} tasks",
                           unit="task", repeats=repeats)
    sides = [(OURS, ours), (OURS_AGAIN, ours)]
    if BEFORE in impls:
        sides.append((BEFORE, impls[BEFORE]))
    for label, impl in sides:
        drain.add(label, _drain_work(impl, drain, label), items=n,
                  setup=functools.partial(impl.prepare_drain, n))
        enqueue.add(label, _enqueue_work(impl, enqueue, n, label), items=n,
                    setup=impl.prepare_enqueue)
    for case in (drain, enqueue):
        case.noise_floor(OURS, OURS_AGAIN)
        case.target(OURS, BEFORE, max_ratio=1.10)
        if BEFORE in skipped:
            case.skip(BEFORE, skipped[BEFORE])


def _drain_work(impl: Implementation, case: Any, label: str = "") -> Callable[[int], None]:
    def work(target: int) -> None:
        impl.timed_drain(target)
        if impl.counts_round_trips:
            row = case.row(label or impl.label)
            per_task = sum(impl.drain_rt) / (row.items * len(impl.drain_rt))
            row.note = f"{per_task:.2f} worker RT/task"
    return work


def _enqueue_work(impl: Implementation, case: Any, n: int,
                  label: str = "") -> Callable[[None], None]:
    def work(_: None) -> None:
        impl.timed_enqueue(n)
        if impl.counts_round_trips:
            case.row(label or impl.label).note = f"{impl.enqueue_rt[-1]:.2f} producer RT/task"
    return work


def process_stopped(pid: int) -> bool:
    """True when every thread of ``pid`` is stopped (Linux /proc; elsewhere assume so)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] != "T":
                    return False
    except FileNotFoundError:
        return True
    return True


def _wait(condition: Callable[[], bool], timeout: float, what: str | Callable[[], str],
          interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            description = what() if callable(what) else what
            raise TimeoutError(f"timed out after {timeout}s waiting for {description}")
        time.sleep(interval)


# --------------------------------------------------------------------------- worker processes


def _serve(label: str, url: str, queue: str, counter_path: str, slot: int) -> None:
    """Run one worker of ``label`` until SIGTERM, counting its Redis requests and tasks."""
    import logging

    global _DONE
    logging.basicConfig(level=logging.WARNING)
    counters = RoundTrips(counter_path, slot + 1)
    _DONE = (counters, slot)
    if label in (OURS, OURS_PREFETCH, BEFORE):
        module = ButtressBefore.module() if label == BEFORE else Buttress.module()
        prefetch = ButtressPrefetch.prefetch if label == OURS_PREFETCH else Buttress.prefetch
        worker = module.Worker(module.FairQueue(counting_client(url, counters, slot), queue),
                               {"noop": noop}, prefetch=prefetch)
        counters.set_ready(slot)
        worker.run()
    elif label == OURS_ASYNC:
        from buttress.distributed import AsyncFairQueue, AsyncWorker

        async def main() -> None:
            client = counting_async_client(url, counters, slot)
            async_worker = AsyncWorker(AsyncFairQueue(client, queue), {"noop": async_noop},
                                       concurrency=ButtressAsync.concurrency)
            counters.set_ready(slot)
            await async_worker.run()
        asyncio.run(main())
    elif label == RQ:
        from rq import Queue, SimpleWorker

        client = counting_client(url, counters, slot)
        rq_worker = SimpleWorker([Queue(queue, connection=client)], connection=client)
        counters.set_ready(slot)
        rq_worker.work(logging_level="WARNING")
    elif label == HUEY:
        huey, _ = make_huey(counting_client(url, counters, slot), queue)
        consumer = huey.create_consumer(workers=1, worker_type="thread", periodic=False)
        counters.set_ready(slot)
        consumer.run()
    elif label == CELERY:
        import warnings

        warnings.simplefilter("ignore")  # the SecurityWarning for root, in every process
        app, _ = make_celery(url, queue)
        counters.set_ready(slot)
        app.worker_main(["worker", "--pool=solo", "-Q", queue, "--without-gossip",
                         "--without-mingle", "--without-heartbeat", "--loglevel=WARNING"])
    elif label == DRAMATIQ:
        import dramatiq

        broker, _ = make_dramatiq(url, queue)
        dramatiq_worker = dramatiq.Worker(broker, worker_threads=8)
        dramatiq_worker.start()
        counters.set_ready(slot)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stop.wait()
        dramatiq_worker.stop()
    elif label in ASYNC_PEERS:
        asyncio.run(_serve_async_peer(label, url, queue, counters, slot))
    else:
        raise SystemExit(f"unknown implementation {label!r}; known: {sorted(IMPLEMENTATIONS)}")


async def _serve_async_peer(label: str, url: str, queue: str, counters: RoundTrips,
                            slot: int) -> None:
    if label == TASKIQ:
        from taskiq.api import run_receiver_task

        broker, _ = make_taskiq(url, queue)
        broker.is_worker_process = True
        await broker.startup()
        counters.set_ready(slot)
        await run_receiver_task(broker, max_async_tasks=100, run_startup=False)
    elif label == SAQ:
        import saq

        saq_queue = make_saq(url, queue)
        saq_worker = saq.Worker(saq_queue, functions=[("noop", saq_noop)], concurrency=10)
        counters.set_ready(slot)
        await saq_worker.start()
    elif label == ARQ:
        from arq import func
        from arq.connections import RedisSettings
        from arq.worker import Worker as ArqWorker

        arq_worker = ArqWorker(functions=[func(arq_noop, name="noop")],
                               redis_settings=RedisSettings.from_dsn(url), queue_name=queue,
                               max_jobs=10, keep_result=0, poll_delay=0.05,
                               handle_signals=False)
        counters.set_ready(slot)
        await arq_worker.async_run()


def _die_with_parent() -> None:
    """In a worker process (Linux): be killed when the bench process dies, even if stopped."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    if len(sys.argv) != 6:
        raise SystemExit("usage: python -m buttress.bench.distributed IMPL URL QUEUE "
                         "COUNTER_FILE SLOT")
    # Run the importable module's code, not __main__'s copy: task names (huey) and
    # function paths (RQ) must match the producer's.
    from buttress.bench.distributed import _serve as serve

    serve(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
