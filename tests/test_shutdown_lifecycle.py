"""The graceful shutdown of a real service: subprocesses, real HTTP, real signals, every flavor.

Each test starts ``examples/slow_service.py`` on one of the four server
flavors (uvicorn with a WSGI or an ASGI application in one process; gunicorn
with two workers, WSGI or ASGI), loads it with real HTTP clients
(``http.client`` over real sockets) and signals it with real SIGTERM/SIGINT.
Under gunicorn the signals go to the master, as a process manager sends them.
Times are short and every wait has a deadline, so the module stays well
inside its budget on a loaded 2-core machine.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from buttress.testing import free_port
from conftest import wait_until

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "slow_service.py"
FLAVORS = ["wsgi", "asgi", "gunicorn-wsgi", "gunicorn-asgi"]
MARGIN = 5.0  # seconds of slack on a loaded 2-core machine


class Service:
    """``slow_service.py`` as a child process, with its log kept for failure messages."""

    def __init__(self, flavor: str, work_ms: int, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--host", "127.0.0.1", "--port", str(self.port),
             "--work-ms", str(work_ms), "--server", flavor, *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"service exited with {self.process.returncode}:\n{self.output()}")
            try:
                return get(self.port, "/readyz")[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout, interval=0.05, message="the service to become ready")

    def drain_status(self) -> dict[str, Any]:
        """/drainz of one process (under gunicorn: of whichever worker answers)."""
        return json.loads(get(self.port, "/drainz")[2])

    def seen(self, path: str) -> int:
        """Requests for ``path`` the application has seen, across every worker."""
        return self.output().count(f"request GET {path}\n")

    def cut(self) -> int:
        """Requests cut at the drain deadline, summed over the workers' logs."""
        return sum(int(n) for n in re.findall(r"cut (\d+) request\(s\)", self.output()))

    def signal(self, signum: int) -> float:
        self.process.send_signal(signum)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"service still running after {timeout}s:\n{self.output()}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


def needs(flavor: str) -> None:
    pytest.importorskip("uvicorn")  # the `http` extra
    if flavor.startswith("gunicorn"):
        pytest.importorskip("gunicorn")


@contextmanager
def service(flavor: str, work_ms: int, *extra: str,
            env: dict[str, str] | None = None) -> Iterator[Service]:
    needs(flavor)
    running = Service(flavor, work_ms, *extra, env=env)
    try:
        running.wait_ready()
        yield running
    finally:
        running.close()


def get(port: int, path: str, timeout: float = 10.0,
        connection: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET on a new connection (or on ``connection``, kept alive): status, headers, body."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        if connection is None:
            conn.close()


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False  # queued just as the listener closed; the next attempt tells


def closed_by_server(conn: http.client.HTTPConnection, timeout: float) -> bool:
    """True once the server closed this idle keep-alive connection (EOF or reset)."""
    if conn.sock is None:
        return True  # http.client already saw the server's Connection: close
    conn.sock.settimeout(timeout)
    try:
        return conn.sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("flavor", FLAVORS)
def test_sigterm_drains_every_accepted_request_and_exits_zero(flavor):
    work, delay = 1.5, 2.0
    # 64 threads: every one of the 51 requests below runs at once, in any worker.
    with service(flavor, int(work * 1000), "--drain-delay", str(delay), "--drain-timeout", "15",
                 "--threads", "64") as svc, ThreadPoolExecutor(60) as pool:
        idle = []
        for _ in range(5):  # idle keep-alive connections, each has served one request
            conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
            assert get(svc.port, "/livez", connection=conn)[0] == 200
            idle.append(conn)
        in_flight = [pool.submit(get, svc.port, "/work", 30.0) for _ in range(50)]
        wait_until(lambda: svc.seen("/work") == 50, 20, message="50 /work requests in flight")

        sigterm = svc.signal(signal.SIGTERM)
        # During the delay: not ready, but still alive and still serving new work.
        wait_until(lambda: get(svc.port, "/readyz")[0] == 503, delay,
                   message="/readyz to answer 503 during the drain delay")
        assert svc.drain_status()["state"] == "draining"
        assert get(svc.port, "/livez")[0] == 200
        # Idle keep-alive connections stay open through the delay; one that is reused is
        # answered and told to close.
        assert not any(closed_by_server(conn, 0.05) for conn in idle)
        reused = idle.pop()
        status_code, headers, _ = get(svc.port, "/livez", connection=reused)
        assert status_code == 200 and headers.get("connection") == "close"
        during_delay: Future[Any] = pool.submit(get, svc.port, "/work", 30.0)
        wait_until(lambda: svc.seen("/work") == 51, delay,
                   message="a new /work accepted during the drain delay")

        # Once the delay ends, the listener is closed ...
        wait_until(lambda: refuses_connections(svc.port), delay + MARGIN,
                   message="new connections to be refused after the delay")
        refused_after = time.monotonic() - sigterm
        assert refused_after >= delay * 0.9, f"listener closed {refused_after:.2f}s after SIGTERM"
        # ... and idle keep-alive connections are closed by the server.
        assert all(closed_by_server(conn, MARGIN) for conn in idle)

        results = [future.result(timeout=30) for future in [*in_flight, during_delay]]
        assert [r[0] for r in results] == [200] * 51
        assert all(r[2] == b"done\n" for r in results)
        # Answered while draining: each told its client not to reuse the connection.
        assert all(r[1].get("connection") == "close" for r in results)

        code = svc.wait(delay + work + MARGIN)
        elapsed = time.monotonic() - sigterm
        assert code == 0, svc.output()
        assert elapsed <= delay + work + MARGIN
        assert "exit code 0" in svc.output()
        assert svc.cut() == 0


@pytest.mark.parametrize("flavor", FLAVORS)
def test_requests_longer_than_the_drain_timeout_are_cut_and_the_exit_code_says_so(flavor):
    delay, drain_timeout = 0.5, 1.0
    with service(flavor, 20_000, "--drain-delay", str(delay),
                 "--drain-timeout", str(drain_timeout)) as svc, ThreadPoolExecutor(3) as pool:
        slow = [pool.submit(get, svc.port, "/work", 30.0) for _ in range(3)]
        wait_until(lambda: svc.seen("/work") == 3, 20, message="3 slow requests in flight")
        sigterm = svc.signal(signal.SIGTERM)
        code = svc.wait(delay + drain_timeout + MARGIN)
        assert time.monotonic() - sigterm <= delay + drain_timeout + MARGIN
        assert code == 3, svc.output()
        assert svc.cut() == 3, svc.output()
        if flavor.startswith("gunicorn"):
            assert "3 request(s) cut, exit code 3" in svc.output()
        for future in slow:  # the responses had not started: each is answered 503
            assert future.result(timeout=10)[0] == 503


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_second_sigint_forces_an_immediate_exit(flavor):
    # Under gunicorn the first signal is SIGTERM: SIGINT is gunicorn's quick shutdown.
    first = signal.SIGTERM if flavor.startswith("gunicorn") else signal.SIGINT
    with service(flavor, 20_000, "--drain-delay", "20", "--drain-timeout", "20") as svc, \
            ThreadPoolExecutor(1) as pool:
        slow = pool.submit(get, svc.port, "/work", 30.0)
        wait_until(lambda: svc.seen("/work") == 1, 20, message="request in flight")
        svc.signal(first)
        wait_until(lambda: get(svc.port, "/readyz")[0] == 503, 10,
                   message="the first signal to start a drain")
        second = svc.signal(signal.SIGINT)
        code = svc.wait(MARGIN)
        assert time.monotonic() - second < MARGIN
        assert code == 130, svc.output()
        assert "forcing exit" in svc.output() or "quick shutdown" in svc.output()
        with pytest.raises((OSError, http.client.HTTPException)):
            slow.result(timeout=10)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_port_in_use_is_a_clear_error_naming_the_port(flavor):
    needs(flavor)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, str(EXAMPLE), "--host", "127.0.0.1", "--port", str(port),
             "--work-ms", "10", "--server", flavor], capture_output=True, text=True, timeout=60,
        )
    # gunicorn prints its "Error: ..." and exits 1, the example's own servers exit 2
    assert done.returncode == (1 if flavor.startswith("gunicorn") else 2), done.stderr
    assert f"port {port} is already in use" in done.stderr
    assert "Booting worker" not in done.stderr  # nothing was served


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--drain-delay", "-1", "--drain-delay"),
    ("--drain-timeout", "soon", "--drain-timeout"),
    ("--drain-timeout", "nan", "--drain-timeout"),
])
def test_bad_timeouts_on_the_command_line_are_rejected_by_name(flag, value, named):
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--port", str(free_port()), "--work-ms", "10",
         "--server", "wsgi", flag, value], capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert named in done.stderr and value in done.stderr


def test_the_grace_period_comes_from_the_environment():
    env = {**os.environ, "BUTTRESS_GRACE_PERIOD": "2", "BUTTRESS_PRE_STOP": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--port", str(free_port()), "--work-ms", "10",
         "--server", "wsgi", "--drain-timeout", "5"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode == 2
    assert "BUTTRESS_GRACE_PERIOD='2'" in done.stderr


def test_a_budget_from_the_grace_period_drives_a_real_drain():
    # BUTTRESS_GRACE_PERIOD=6: margin 0.6, drain delay 1.2, cleanup 0.6, drain timeout 3.6.
    with service("wsgi", 500, env={"BUTTRESS_GRACE_PERIOD": "6"}) as svc, \
            ThreadPoolExecutor(1) as pool:
        work = pool.submit(get, svc.port, "/work", 30.0)
        wait_until(lambda: svc.seen("/work") == 1, 20, message="in flight")
        sigterm = svc.signal(signal.SIGTERM)
        wait_until(lambda: refuses_connections(svc.port), 6, message="listener closed")
        assert time.monotonic() - sigterm >= 1.2 * 0.9  # the delay came from the split
        assert work.result(timeout=10)[0] == 200
        assert svc.wait(6) == 0, svc.output()
        assert time.monotonic() - sigterm < 6  # inside the grace period
