"""Suite ``service``: what the gateway's guarantees cost, and what metrics registration costs.

Gateway cases: four servers run side by side, each in its own process, all the
same ASGI app (:class:`buttress.service.Gateway`: JSON parsing, validation, the
shutdown middleware) served by ``serve_asgi`` on uvicorn.  Two admit through
the real path (dedupe claim on the id, fair-queue enqueue script, done write,
batched): with the sync components on a thread
(:class:`~buttress.service.ThreadedAdmission`, the default) and with
``--admission async`` on the event loop
(:class:`~buttress.service.AsyncAdmission`).  Each has its baseline, the same
app doing one bare ``LPUSH`` of the task into a Redis list the same way:
redis-py on a thread pool, or ``redis.asyncio`` on the loop.  A client process
sends POSTs with fresh ids over keep-alive connections with a raw-socket HTTP
client:

* throughput: requests spread over 8 connections (time per request is 1 / throughput);
* latency: one connection, one request at a time; p50 and p99 are in the notes.

The promise: the guarantees cost at most 2x the bare app's time per request.

Metrics cases: a component's own work (the scheduler suite's no-op tasks
through 4 workers, a Bloom filter's batch insert and query of 1M keys) on an
object registered in a prometheus-client registry (and scraped once, untimed)
vs not registered, with the noise floor of two unregistered runs: registration
adds nothing to the hot path.  What one scrape costs (a ``stats()`` call) is
measured apart, for a scheduler with 100k tasks queued and a 12 MB filter.

Also runnable directly: ``python -m buttress.bench.service serve ...`` and
``... load`` are the two helper processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import IO, Any

ORDER = 70

GUARANTEES = "buttress"
ASYNC = "buttress --admission async"
BARE = "bare LPUSH app"
BARE_ASYNC = "bare LPUSH app, redis.asyncio"
NOTES = {GUARANTEES: "dedupe claim + fair-queue enqueue, batched, on a thread",
         ASYNC: "the same steps awaited on the event loop",
         BARE: "same app, one redis-py LPUSH per request on a thread pool",
         BARE_ASYNC: "same app, one redis.asyncio LPUSH per request on the loop"}
MODES = {GUARANTEES: "service", ASYNC: "service-async", BARE: "bare-threads",
         BARE_ASYNC: "bare"}
CONNECTIONS = 8


def register(session: Any) -> None:
    if session.peer("uvicorn") is None or session.peer("prometheus_client") is None:
        session.notes.append("service: uvicorn or prometheus-client is not installed; skipped")
        return
    _metrics_cases(session)
    url = session.redis_url()
    throughput_n = 2000 if session.quick else 4000
    latency_n = 500 if session.quick else 1000
    repeats = 5 if session.quick else 9
    client = _LoadClient()
    session.on_close(client.close)
    servers = {}
    for name, mode in MODES.items():
        server = _Server(url, mode)
        session.on_close(server.close)
        servers[name] = server
    for requests, connections, title in (
        (throughput_n, CONNECTIONS, f"{CONNECTIONS} keep-alive connections"),
        (latency_n, 1, "1 connection, one request at a time (latency)"),
    ):
        case = session.case("service", f"gateway POST /v1/tasks: {requests:,} requests, "
                            f"{title}", unit="request", repeats=repeats)
        for name, server in servers.items():
            row_note = NOTES[name]
            case.add(name, _load(client, server, requests, connections, case, name, row_note),
                     setup=server.reset, items=requests, note=row_note)
        case.target(GUARANTEES, BARE, max_ratio=2.0)
        case.target(ASYNC, BARE_ASYNC, max_ratio=2.0)


def _load(client: _LoadClient, server: _Server, requests: int, connections: int, case: Any,
          name: str, note: str) -> Any:
    latencies: list[float] = []

    def work(_: Any = None) -> None:
        answer = client.run(server.port, requests, connections)
        latencies.extend(answer["latencies"])
        ordered = sorted(latencies)
        p50, p99 = ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)]
        row = case.row(name)
        if row is not None:
            row.note = f"{note}; p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms"
        if answer["errors"]:
            raise RuntimeError(f"{name}: {answer['errors']} requests not answered 202")

    return work


def _metrics_cases(session: Any) -> None:
    """A component's own case, its object registered vs not; what one scrape costs, apart.

    Registration only puts the object in the registry's collector: nothing runs
    until a scrape.  So each "own" case times exactly the component's work (the
    scheduler case of the scheduler suite; the Bloom filter's insert_many and
    contains_many), on an object built in the untimed setup, registered and
    scraped there once (or not registered).  Rounds interleave, so the ratio is
    paired; "not registered again" is the same work once more: its ratio to
    "not registered" is the case's noise floor.  What a scrape costs (a stats()
    call, under the scheduler's lock) is a case of its own.
    """
    import numpy as np
    from prometheus_client import CollectorRegistry, generate_latest

    from buttress import BloomFilter, TaskScheduler
    from buttress.bench.scheduler import run_scheduler
    from buttress.metrics import register as register_metrics

    repeats = 11 if session.quick else 21
    n = 100_000 if session.quick else 300_000
    priorities = [i % 10 for i in range(n)]

    def scheduler_setup(registered: bool) -> Any:
        def setup() -> TaskScheduler:
            scheduler = TaskScheduler(4, high_water=n + 1, max_size=n + 1).start()
            if registered:
                registry = CollectorRegistry()
                register_metrics(scheduler, registry, name="bench")
                generate_latest(registry)  # scraped: the collector has run
            return scheduler
        return setup

    case = session.case("service", f"metrics: TaskScheduler, {n:,} no-op tasks through 4 "
                        "workers, registered vs not", unit="task", repeats=repeats)
    for name, registered in (("registered", True), ("not registered", False),
                             ("not registered again", False)):
        case.add(name, lambda s: run_scheduler(s, priorities), items=n,
                 setup=scheduler_setup(registered),
                 note="registered and scraped before the timed run" if registered else
                 "the same work again: the noise floor" if name.endswith("again") else "")
    case.noise_floor("not registered again", "not registered")
    case.target("registered", "not registered", max_ratio=1.05)

    keys = np.random.default_rng(0).integers(0, 2**63, size=1_000_000, dtype=np.uint64)

    def bloom_setup(registered: bool) -> Any:
        def setup() -> BloomFilter:
            bloom = BloomFilter.for_capacity(len(keys), 0.01)
            if registered:
                registry = CollectorRegistry()
                register_metrics(bloom, registry, name="bench")
                generate_latest(registry)
            return bloom
        return setup

    def bloom_work(bloom: BloomFilter) -> None:
        bloom.insert_many(keys)
        bloom.contains_many(keys)

    bloom_case = session.case("service", f"metrics: BloomFilter insert_many + contains_many, "
                              f"{len(keys):,} uint64 keys, registered vs not", unit="key",
                              repeats=repeats)
    for name, registered in (("registered", True), ("not registered", False),
                             ("not registered again", False)):
        bloom_case.add(name, bloom_work, items=len(keys), setup=bloom_setup(registered),
                       note="registered and scraped before the timed run" if registered else
                       "the same work again: the noise floor" if name.endswith("again")
                       else "")
    bloom_case.noise_floor("not registered again", "not registered")
    bloom_case.target("registered", "not registered", max_ratio=1.05)

    _scrape_cases(session)


def _scrape_cases(session: Any) -> None:
    """What one scrape costs: the work Prometheus adds, every scrape interval, per object."""
    import numpy as np
    from prometheus_client import CollectorRegistry, generate_latest

    from buttress import BloomFilter, TaskScheduler
    from buttress.metrics import register as register_metrics

    queued = 100_000
    release = threading.Event()
    scheduler = TaskScheduler(1, high_water=queued + 2, max_size=queued + 2).start()

    def close_held() -> None:
        release.set()
        scheduler.shutdown(drain=False)

    session.on_close(close_held)
    scheduler.enqueue(release.wait, priority=100)  # holds the one worker: the rest stay queued
    for i in range(queued):
        scheduler.enqueue(_noop, priority=i % 10)
    registry = CollectorRegistry()
    register_metrics(scheduler, registry, name="bench")
    case = session.case("service", f"metrics: one scrape of a TaskScheduler with {queued:,} "
                        "tasks queued", unit="scrape", repeats=5)
    case.add("generate_latest", lambda: generate_latest(registry), items=1,
             note="the whole exposition of the registry")
    case.add("stats()", scheduler.stats, items=1, note="held under the scheduler's lock")

    bloom = BloomFilter.for_capacity(10_000_000, 0.01)
    bloom.insert_many(np.arange(5_000_000, dtype=np.uint64))
    bloom_registry = CollectorRegistry()
    register_metrics(bloom, bloom_registry, name="bench")
    bloom_case = session.case("service", f"metrics: one scrape of a BloomFilter of "
                              f"{bloom.num_bits // 8 / 1e6:.0f} MB", unit="scrape", repeats=5)
    bloom_case.add("generate_latest", lambda: generate_latest(bloom_registry), items=1)
    bloom_case.add("stats()", bloom.stats, items=1, note="counts the set bits")


def _noop() -> None:
    return None


# --------------------------------------------------------------------------- the processes


class _Server:
    """A gateway process (real admission, or a bare LPUSH baseline) on a free port."""

    def __init__(self, redis_url: str, mode: str) -> None:
        from buttress.testing import free_port

        self.redis_url = redis_url
        self.queue = f"bench-{mode}-{os.getpid()}"
        self.port = free_port()
        command = [sys.executable, "-m", "buttress.bench.service", "serve", "--redis",
                   redis_url, "--queue", self.queue, "--port", str(self.port), "--mode", mode]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        _wait_ready(self.port, self.process)

    def reset(self) -> None:
        """Untimed: empty this server's keys so every run starts from the same state."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            for pattern in (f"buttress:{{{self.queue}}}:*", f"buttress:svc:{self.queue}:*",
                            f"{{buttress:svc:{self.queue}:admit}}:*", f"{self.queue}:*"):
                batch = list(client.scan_iter(pattern, count=10_000))
                for start in range(0, len(batch), 10_000):
                    client.delete(*batch[start:start + 10_000])
        finally:
            client.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    from buttress.bench._http import KeepAliveConnection

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bench gateway exited with {process.returncode}")
        try:
            with KeepAliveConnection(port, timeout=1) as connection:
                if connection.request("GET", "/readyz")[0] == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"bench gateway on port {port} not ready in {timeout}s")


class _LoadClient:
    """A client process fed one command per run over a pipe (so it starts once)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "buttress.bench.service", "load"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        self.runs = 0

    def run(self, port: int, requests: int, connections: int) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.runs += 1
        command = {"port": port, "requests": requests, "connections": connections,
                   "prefix": f"r{self.runs}-"}
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the bench load client exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _serve(args: argparse.Namespace) -> int:
    """The server process: the real gateway, or the same app with a bare LPUSH admission."""
    from buttress.service import Gateway, Service, settings_from
    from buttress.shutdown import GracefulShutdown, ShutdownBudget, serve_asgi

    controller = GracefulShutdown(ShutdownBudget(drain_delay=0, drain_timeout=5))
    settings = settings_from({"redis_url": args.redis, "queue": args.queue,
                              "high_water": "100000000",
                              "admission": "async" if args.mode == "service-async"
                              else "threads"}, {})
    if args.mode.startswith("service"):
        service = Service(settings, controller=controller)
        controller.add_cleanup(service.close)
        return serve_asgi(service.app, host="127.0.0.1", port=args.port, controller=controller)
    admission = _BareAdmission(args.redis, f"{args.queue}:list",
                               threads=args.mode == "bare-threads")
    app = Gateway(admission, max_body_bytes=settings.max_body_bytes,
                  max_tenant_bytes=settings.max_tenant_bytes)
    return serve_asgi(app, host="127.0.0.1", port=args.port, controller=controller)


class _BareAdmission:
    """The gateway's AdmissionPort doing one LPUSH: redis.asyncio, or redis-py in threads."""

    def __init__(self, redis_url: str, key: str, *, threads: bool) -> None:
        import redis
        import redis.asyncio

        self.key = key
        self._pending = 0
        if threads:
            from concurrent.futures import ThreadPoolExecutor

            self.client: Any = redis.Redis.from_url(redis_url, max_connections=16)
            self.pool: Any = ThreadPoolExecutor(max_workers=8)
        else:
            self.client = redis.asyncio.Redis.from_url(redis_url)
            self.pool = None

    async def admit(self, request: Any) -> Any:
        import asyncio

        from buttress.service import Outcome

        item = json.dumps(request._asdict())
        self._pending += 1
        try:
            if self.pool is None:
                await self.client.lpush(self.key, item)
            else:
                await asyncio.get_running_loop().run_in_executor(
                    self.pool, self.client.lpush, self.key, item)
        finally:
            self._pending -= 1
        return Outcome(202, {"id": request.id, "state": "queued"}, "accepted")

    async def status(self, task_id: str) -> Any:
        from buttress.service import Outcome

        return Outcome(404, {"id": task_id}, "not_found")

    def pending(self) -> int:
        return self._pending

    def stats(self) -> dict[str, Any]:
        return {"pending": self._pending, "batches": 0}

    async def aclose(self) -> None:
        if self.pool is None:
            await self.client.aclose()
        else:
            self.pool.shutdown()


def _load_loop(stdin: IO[str], stdout: IO[str]) -> int:
    """The client process: for each command line, send the POSTs and answer with timings."""
    for line in stdin:
        command = json.loads(line)
        answer = _send(command["port"], command["requests"], command["connections"],
                       command["prefix"])
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()
    return 0


def _send(port: int, requests: int, connections: int, prefix: str) -> dict[str, Any]:
    from buttress.bench._http import KeepAliveConnection

    per_connection = [requests // connections + (i < requests % connections)
                      for i in range(connections)]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def one_connection(number: int, count: int) -> None:
        mine: list[float] = []
        failed = 0
        with KeepAliveConnection(port) as connection:
            for i in range(count):
                body = json.dumps({"id": f"{prefix}{number}-{i}", "tenant": f"t{i % 3}",
                                   "task": "noop", "priority": 0,
                                   "payload": {"n": i}}).encode()
                started = time.perf_counter()
                status, _answer = connection.request("POST", "/v1/tasks", body)
                mine.append(time.perf_counter() - started)
                if status != 202:
                    failed += 1
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=one_connection, args=(n, count))
               for n, count in enumerate(per_connection)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "errors": errors[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m buttress.bench.service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("--redis", required=True)
    serve.add_argument("--queue", required=True)
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--mode", choices=sorted(MODES.values()), default="service")
    commands.add_parser("load")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _load_loop(sys.stdin, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
