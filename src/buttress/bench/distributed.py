"""Distributed suite: no-op tasks through Redis with 4 worker processes, against RQ and huey.

Every implementation gets 4 worker processes (one worker each) on the same
Redis, and is measured the same way:

* *drain*: with the workers paused (SIGSTOP), the producer enqueues N no-op
  tasks (untimed); the clock runs from SIGCONT until the N tasks are done.
* *enqueue*: one producer enqueues N tasks, one call per task (workers paused).

Peers, each in its fastest configuration that still delivers every task:

* ``rq SimpleWorker``: RQ's default Worker forks a work horse per job; the
  SimpleWorker runs jobs in-process and is much faster.  Completion is read from
  RQ's FinishedJobRegistry.
* ``huey PriorityRedisHuey``: huey's priority Redis queue (a sorted set, BZPOPMIN),
  one thread-type consumer per process, results off.  huey has no
  completion record for tasks returning None, so its drain ends when its queue
  is empty; the at most 4 tasks still running then (a no-op each) are not
  waited for, which flatters huey slightly.

Ours: ``buttress`` is a FairQueue with 3 tenants (tasks spread round robin) and
one Worker per process with default settings (prefetch 1: a worker holds one
lease at a time, and acknowledges it with its next lease call, so one round trip
per task); the targets are judged on it.  ``buttress prefetch=8`` leases 8 tasks
per round trip, to show what batching buys.

Round trips are counted on the client side by a redis-py connection class that
counts requests sent (a pipeline or a script call is one); worker processes
publish their counts through a shared memory-mapped file.  Run a worker
process by hand with ``python -m buttress.bench.distributed IMPL URL QUEUE``.
"""

from __future__ import annotations

import functools
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import buttress
from buttress.bench import BenchSession

ORDER = 60

WORKERS = 4
OURS = "buttress"
OURS_PREFETCH = "buttress prefetch=8"
RQ = "rq SimpleWorker"
HUEY = "huey PriorityRedisHuey"
TENANTS = ("tenant-a", "tenant-b", "tenant-c")


def noop(*args: Any) -> None:
    """The task every implementation runs (RQ imports it by name)."""


# --------------------------------------------------------------------------- round trips


class RoundTrips:
    """Request counters: one slot per process in a shared memory-mapped file."""

    SLOT = 16  # bytes: request count, ready flag

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


# --------------------------------------------------------------------------- implementations


def make_huey(client: Any, queue: str) -> tuple[Any, Any]:
    from huey import PriorityRedisHuey

    huey = PriorityRedisHuey(queue, connection_pool=client.connection_pool, results=False)
    return huey, huey.task(name="noop")(noop)


class Implementation:
    """One queue library: its producer, its worker processes, its completion counter."""

    label = ""

    def __init__(self, url: str, queue: str, counters: RoundTrips, first_slot: int) -> None:
        import redis

        self.url = url
        self.queue = queue
        self.counters = counters
        self.producer_slot = first_slot
        self.worker_slots = range(first_slot + 1, first_slot + 1 + WORKERS)
        self.producer = counting_client(url, counters, self.producer_slot)
        self.observer = redis.Redis.from_url(url)  # uncounted: polls for completion
        self.processes: list[subprocess.Popen[bytes]] = []
        self.enqueue_rt: list[float] = []
        self.drain_rt: list[float] = []

    # -- the parts a library fills in

    def enqueue(self, i: int) -> None:
        raise NotImplementedError

    def completed(self) -> int:
        """Tasks done so far (monotonic), read with the uncounted client."""
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    # -- the shared measurement

    def start(self) -> None:
        if self.processes:
            return
        # The workers import this same buttress, installed or not.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(buttress.__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p))
        for slot in self.worker_slots:
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "buttress.bench.distributed", self.label, self.url,
                 self.queue, self.counters.path, str(slot)],
                env=env, stdin=subprocess.DEVNULL, start_new_session=True,
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
        for i in range(50):
            self.enqueue(i)
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
        for i in range(n):
            self.enqueue(i)
        self.enqueue_rt.append((self.counters.count(self.producer_slot) - before) / n)

    def prepare_drain(self, n: int) -> int:
        """Enqueue ``n`` tasks with the workers paused; return the completion count to reach."""
        self.prepare_enqueue()
        target = self.completed() + n  # counted before enqueueing, so it is always reachable
        for i in range(n):
            self.enqueue(i)
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
        from buttress.distributed import FairQueue

        self.fair = FairQueue(self.producer, self.queue, high_water=10**9, low_water=10**9 - 1)
        self.meta = self.fair.prefix + "meta"

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


class Rq(Implementation):
    label = RQ

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from rq import Queue
        from rq.registry import FinishedJobRegistry

        self.rq_queue = Queue(self.queue, connection=self.producer)
        self.finished = FinishedJobRegistry(self.queue, connection=self.observer)

    def enqueue(self, i: int) -> None:
        self.rq_queue.enqueue(noop, i)

    def completed(self) -> int:
        return int(self.observer.zcard(self.finished.key))

    def clear(self) -> None:
        self.rq_queue.empty()


class Huey(Implementation):
    label = HUEY

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.huey, self.task = make_huey(self.producer, self.queue)
        self.done = 0
        self._target = 0

    def enqueue(self, i: int) -> None:
        self.task(i)
        self._target += 1

    def completed(self) -> int:
        # Drained queue = done (see the module docstring).
        if self.observer.zcard(self.huey.storage.queue_key) == 0:
            self.done = self._target
        return self.done

    def clear(self) -> None:
        self.huey.storage.flush_queue()
        self.done = self._target


class ButtressPrefetch(Buttress):
    """Each worker leases 8 tasks per round trip (and acks them with the next one)."""

    label = OURS_PREFETCH
    prefetch = 8


IMPLEMENTATIONS: dict[str, type[Implementation]] = {
    OURS: Buttress, OURS_PREFETCH: ButtressPrefetch, RQ: Rq, HUEY: Huey}
PEER_MODULES = {RQ: "rq", HUEY: "huey"}


# --------------------------------------------------------------------------- the suite


def register(session: BenchSession) -> None:
    n = 2_000 if session.quick else 10_000
    url = session.redis_url()
    counters = RoundTrips(tempfile.mkstemp(prefix="buttress-bench-rt-")[1],
                          slots=len(IMPLEMENTATIONS) * (WORKERS + 1))
    impls: list[Implementation] = []
    skipped: list[tuple[str, str]] = []
    for index, (label, cls) in enumerate(IMPLEMENTATIONS.items()):
        module = PEER_MODULES.get(label)
        if module and session.peer(module) is None:
            skipped.append((label, f"{module} is not installed (pip install 'buttress[compare]')"))
            continue
        queue = f"bench-{label.replace(' ', '-')}-{os.getpid()}"
        impls.append(cls(url, queue, counters, index * (WORKERS + 1)))

    drain = session.case("distributed", f"drain {n:,} no-op tasks, {WORKERS} worker processes",
                         unit="task")
    enqueue = session.case("distributed", f"enqueue {n:,} tasks, one producer", unit="task")
    for impl in impls:
        drain.add(impl.label, _drain_work(impl, drain), items=n,
                  setup=functools.partial(impl.prepare_drain, n))
        if impl.label != OURS_PREFETCH:  # same enqueue as "buttress"
            enqueue.add(impl.label, _enqueue_work(impl, enqueue, n), items=n,
                        setup=impl.prepare_enqueue)
    # Stop the workers before the session stops its Redis.
    for impl in impls:
        session.on_close(impl.close)
    for case in (drain, enqueue):
        for label, reason in skipped:
            case.skip(label, reason)
    # The promise is worker throughput.  Enqueue is reported without a target: huey's
    # is one ZADD, ours one script that also does admission and fairness bookkeeping.
    for peer in (RQ, HUEY):
        drain.target(OURS, peer, min_speedup=1.0)
    session.notes.append(
        "distributed: peers run in their fastest configuration that delivers every task: "
        "RQ SimpleWorker (no fork per job), huey PriorityRedisHuey with a thread consumer, "
        "results off; huey's drain ends when its queue is empty (it keeps no completion "
        "record), which flatters it by up to 4 running no-op tasks. RT = Redis round trips "
        "(requests; a pipeline or script call is one), counted on the client side. "
        "Enqueue has no target: huey's is one ZADD, ours a script that also does "
        "admission (water marks) and fairness bookkeeping.")


def _drain_work(impl: Implementation, case: Any) -> Callable[[int], None]:
    def work(target: int) -> None:
        impl.timed_drain(target)
        row = case.row(impl.label)
        per_task = sum(impl.drain_rt) / (row.items * len(impl.drain_rt))
        row.note = f"{per_task:.2f} worker RT/task"
    return work


def _enqueue_work(impl: Implementation, case: Any, n: int) -> Callable[[None], None]:
    def work(_: None) -> None:
        impl.timed_enqueue(n)
        case.row(impl.label).note = f"{impl.enqueue_rt[-1]:.2f} producer RT/task"
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
    """Run one worker of ``label`` until SIGTERM, counting its Redis requests."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    counters = RoundTrips(counter_path, slot + 1)
    client = counting_client(url, counters, slot)
    if label in (OURS, OURS_PREFETCH):
        from buttress.distributed import FairQueue, Worker

        prefetch = ButtressPrefetch.prefetch if label == OURS_PREFETCH else Buttress.prefetch
        worker = Worker(FairQueue(client, queue), {"noop": noop}, prefetch=prefetch)
        counters.set_ready(slot)
        worker.run()
    elif label == RQ:
        from rq import Queue, SimpleWorker

        rq_worker = SimpleWorker([Queue(queue, connection=client)], connection=client)
        counters.set_ready(slot)
        rq_worker.work(logging_level="WARNING")
    elif label == HUEY:
        huey, _ = make_huey(client, queue)
        consumer = huey.create_consumer(workers=1, worker_type="thread", periodic=False)
        counters.set_ready(slot)
        consumer.run()
    else:
        raise SystemExit(f"unknown implementation {label!r}; known: {sorted(IMPLEMENTATIONS)}")


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
