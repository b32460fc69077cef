"""Real gateway and worker processes for the service tests, and the handlers they run.

The handlers record every run in Redis (``HINCRBY <queue>:runs <id> 1`` and the
pid that ran it), which is what "handled exactly once" is checked against.

Every process keeps its stderr (in its log file, or a temporary file), so a
process that exits when nobody asked it to is reported with its exit code and
the tail of what it said: :class:`Watch` checks the processes a test started
on every poll of its wait loops, and fails at once instead of at a timeout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import IO, Any

import httptools
import httpx
import redis

from buttress.testing import free_port

_TESTS = os.path.dirname(os.path.abspath(__file__))
_clients: dict[str, Any] = {}
STDERR_TAIL = 3000  # characters of a dead process's stderr shown in the failure


def _client() -> Any:
    url = os.environ["BUTTRESS_REDIS_URL"]
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, socket_timeout=10)
    return _clients[url]


def record(payload: Any) -> None:
    """The side effect under test: count runs per id, and remember which process ran it."""
    queue = os.environ["BUTTRESS_QUEUE"]
    pipe = _client().pipeline(transaction=True)
    pipe.hincrby(f"{queue}:runs", payload["n"], 1)
    pipe.hincrby(f"{queue}:runs_by:{os.getpid()}", payload["n"], 1)
    pipe.rpush(f"{queue}:order", payload["tenant"])
    pipe.execute()


def slow(payload: Any) -> None:
    time.sleep(float(payload.get("seconds", 0.5)))
    record(payload)


HANDLERS = {"record": record, "slow": slow}


def task(task_id: str, tenant: str = "acme", n: Any = None, **extra: Any) -> dict[str, Any]:
    """A ``POST /v1/tasks`` body for the ``record`` handler (``n``: its run key)."""
    body = {"id": task_id, "tenant": tenant, "task": "record", "priority": 0,
            "payload": {"n": n if n is not None else task_id, "tenant": tenant}}
    body.update(extra)
    return body


def service_env(redis_url: str, queue: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, env.get("PYTHONPATH", "")) if p)
    env.update(BUTTRESS_REDIS_URL=redis_url, BUTTRESS_QUEUE=queue,
               BUTTRESS_SERVICE_HANDLERS="service_support:HANDLERS")
    env.update(extra)
    return env


class ProcessDied(AssertionError):
    """A gateway or worker exited while the test still needed it."""


class _Process:
    """A child process whose stderr is kept, and which knows whether its exit was asked for."""

    process: subprocess.Popen[bytes]
    kind = "process"

    def _start(self, command: list[str], env: dict[str, str], log: IO[Any] | None) -> None:
        # Never a pipe: nobody reads it while the process runs, and a full pipe blocks it.
        self._stderr: IO[Any] = log if log is not None else tempfile.TemporaryFile()  # noqa: SIM115
        self.stopping = False  # set when the test stops or kills it on purpose
        self.process = subprocess.Popen(command, env=env, stdout=log or subprocess.DEVNULL,
                                        stderr=self._stderr)

    def stderr_tail(self, limit: int = STDERR_TAIL) -> str:
        fd = self._stderr.fileno()
        size = os.fstat(fd).st_size
        return os.pread(fd, limit, max(0, size - limit)).decode(errors="replace")

    def died(self) -> str | None:
        """Why this process is gone when it should not be (None: running, or stopped on purpose)."""
        if self.stopping:
            return None
        code = self.process.poll()
        if code is None:
            return None
        return (f"{self.kind} pid {self.process.pid} exited unexpectedly with code {code}; "
                f"its stderr ends with:\n{self.stderr_tail()}")

    def stop(self) -> None:
        """SIGTERM (once: a second one means "now" to a server), without waiting."""
        if not self.stopping and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.stopping = True

    def terminate(self, timeout: float = 30.0) -> int:
        self.stop()
        return self.process.wait(timeout)

    def kill(self) -> None:
        self.stopping = True
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Gateway(_Process):
    """A ``python -m buttress serve`` process on a free loopback port."""

    kind = "gateway"

    def __init__(self, redis_url: str, queue: str, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None, log: Any = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "buttress", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--tasks", "record,slow", *args]
        self._start(command, service_env(redis_url, queue, **(env or {})), log)

    def wait_ready(self, timeout: float = 30.0, watch: Watch | None = None) -> Gateway:
        """Wait for /readyz; fail at once if this process (or one ``watch`` holds) died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            failure = self.died()
            if failure is not None:
                raise ProcessDied(failure)
            if watch is not None:
                watch.check()
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"gateway on port {self.port} not ready in {timeout}s; its stderr "
                           f"ends with:\n{self.stderr_tail()}")


class Worker(_Process):
    """A ``python -m buttress worker`` process running the service handlers."""

    kind = "worker"

    def __init__(self, redis_url: str, queue: str, *args: str, env: dict[str, str] | None = None,
                 log: Any = None) -> None:
        command = [sys.executable, "-m", "buttress", "worker", "--redis", redis_url,
                   "--queue", queue, "--handlers", "buttress.service.worker:handlers", *args]
        self._start(command, service_env(redis_url, queue, **(env or {})), log)
        self.client_name = f"buttress-worker:{queue}:{self.process.pid}"

    def serving(self, client: Any) -> bool:
        """True once the worker talks to Redis (its signal handlers are installed by then)."""
        return any(entry.get("name") == self.client_name for entry in client.client_list())


def kill_mid_task_then_redeliver(client: Any, redis_url: str, queue_name: str, *,
                                 lease_ms: int, seconds: float, worker_args: Iterable[str] = (),
                                 env: dict[str, str] | None = None) -> int:
    """One slow task k-1: SIGKILL its worker once it runs, let a second worker redeliver it.

    Returns the second worker's exit code after SIGTERM (the caller asserts what it needs:
    the run count, the attempts).
    """
    from buttress.distributed import FairQueue
    from conftest import wait_until

    queue = FairQueue(client, queue_name, lease_ms=lease_ms)
    queue.enqueue("slow", {"id": "k-1", "payload": {"n": "k-1", "tenant": "t",
                                                    "seconds": seconds}}, tenant="t")
    args = ("--lease-ms", str(lease_ms), *worker_args)
    first = Worker(redis_url, queue_name, *args, env=env)
    try:
        wait_until(lambda: client.hget(f"buttress:svc:{queue_name}:task:{{k-1}}",
                                       "state") == b"running", timeout=30)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
    finally:
        first.kill()
    second = Worker(redis_url, queue_name, *args, env=env)
    try:
        wait_until(lambda: queue.stats()["completed"] == 1, timeout=60)
    finally:
        code = second.terminate()
    return code


class Watch:
    """The processes a test started; every wait loop of the test asks :meth:`check` first.

    A process the test stops or kills through :meth:`_Process.terminate` /
    :meth:`_Process.kill` (or marks ``stopping``) is exempt.  :meth:`fail`
    records a failure found elsewhere (another thread) so that every loop
    that checks stops too.  As a context manager it kills what it holds on
    exit.  Thread-safe.
    """

    def __init__(self, processes: Iterable[_Process] = ()) -> None:
        self._lock = threading.Lock()
        self.processes: list[_Process] = list(processes)
        self.failure: str | None = None

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every watched process still running (the test is over)."""
        self.fail("the test is over")  # a loop still waiting in another thread stops now
        for process in self.processes:
            process.kill()

    def add(self, process: _Process) -> Any:
        with self._lock:
            self.processes.append(process)
        return process

    def fail(self, reason: str) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = reason

    def check(self) -> None:
        """Raise ProcessDied if a watched process exited unasked (or a failure was recorded)."""
        with self._lock:
            processes = list(self.processes)
        for process in processes:
            failure = process.died()
            if failure is not None:
                self.fail(failure)
                break
        if self.failure is not None:
            raise ProcessDied(self.failure)

    def wait_until(self, condition: Callable[[], object], timeout: float = 10.0,
                   interval: float = 0.01, message: str = "condition") -> object:
        """conftest's wait_until, failing at once when a watched process dies."""
        from conftest import wait_until  # not at import: worker processes import this module

        def checked() -> object:
            self.check()
            return condition()

        return wait_until(checked, timeout=timeout, interval=interval, message=message)


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection for load generation, one request at a time.

    httpx costs the load generator about 3 ms of CPU per request, more than the
    gateway spends answering it, so on a 2-core machine the client, not the
    service, set the pace.  This writes the request bytes itself and leaves the
    parsing of responses to httptools (uvicorn's C parser).  A connection that
    fails (refused, reset, closed by the server) raises ``ConnectionError``; the
    caller opens a new one.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._prefix = f"Host: {host}:{port}\r\nContent-Type: application/json\r\n".encode()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[tuple[int, dict[bytes, bytes], bytes]] | None = None
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self.closed = False

    @classmethod
    async def open(cls, url: str) -> HttpConnection:
        parsed = urllib.parse.urlsplit(url)
        assert parsed.hostname and parsed.port, url
        connection = cls(parsed.hostname, parsed.port)
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: connection, parsed.hostname, parsed.port)
        return connection

    async def request(self, method: str, path: str,
                      body: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
        """Send one request, wait for its response: (status, lower-case headers, body)."""
        if self.closed or self._transport is None:
            raise ConnectionError("connection closed")
        loop = asyncio.get_running_loop()
        self._answer = loop.create_future()
        self._headers, self._body = {}, []
        self._transport.write(b"%s %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (
            method.encode(), path.encode(), self._prefix, len(body), body))
        return await self._answer

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"connection lost: {exc!r}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_result((self._parser.get_status_code(), self._headers,
                               b"".join(self._body)))
        if not self._parser.should_keep_alive():
            self.close()

    def _fail(self, error: Exception) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)
