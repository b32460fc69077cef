"""Hostile HTTP, slow clients, streams and the preStop drain, on every server flavor.

The attacks go over raw sockets to a real service (``tests/shutdown_apps.py``,
which logs every request its application sees).  Each must be refused (the
connection closed, or answered 400/414/431) and never reach the application
as a request of its own; parsing is llhttp's (see ``buttress.shutdown._asgi``),
buttress adds only the caps on the request head.  The same flavors as
test_shutdown_lifecycle.py: uvicorn with a WSGI or an ASGI application, and
gunicorn (two workers) with either.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from buttress.testing import free_port
from conftest import wait_until
from test_shutdown_lifecycle import FLAVORS, MARGIN, Service, get, needs, refuses_connections

pytestmark = pytest.mark.slow

APPS = Path(__file__).resolve().parent / "shutdown_apps.py"


class Target(Service):
    """``shutdown_apps.py`` as a child process (the attacks' target)."""

    def __init__(self, flavor: str, env: dict[str, str] | None = None) -> None:
        import tempfile

        self.port = free_port()
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [sys.executable, str(APPS), "--server", flavor, "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "BUTTRESS_DRAIN_DELAY": "0", "BUTTRESS_DRAIN_TIMEOUT": "5",
                 **(env or {})},
        )

    def saw(self, method: str, path: str) -> bool:
        return f"seen {method} {path} " in self.output()


@pytest.fixture(scope="module", params=FLAVORS)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    needs(request.param)
    running = Target(request.param)
    try:
        running.wait_ready()
        running.flavor = request.param  # type: ignore[attr-defined]
        yield running
    finally:
        running.close()


def exchange(port: int, data: bytes, *, half_close: bool = False, timeout: float = 2.0) -> bytes:
    """Send raw bytes, read until the server closes (or ``timeout`` of silence)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before everything was sent
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return received


def statuses(received: bytes) -> list[int]:
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]


def settle(target: Target, name: str) -> None:
    """Wait until a request sent after the attack was seen: the log is up to date."""
    assert get(target.port, f"/after-{name}")[0] == 200
    wait_until(lambda: target.saw("GET", f"/after-{name}"), 10, message="the sentinel request")


H = b"Host: x\r\n"
SMUGGLE = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
REFUSED = {
    "conflicting-content-length":
        b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 0\r\nContent-Length: 37\r\n\r\n"
        + SMUGGLE,
    "duplicate-content-length":
        b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "content-length-with-transfer-encoding":
        b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + SMUGGLE,
    "transfer-encoding-xchunked":
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + SMUGGLE,
    "transfer-encoding-space-before-colon":
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLE,
    "transfer-encoding-chunked-identity":
        b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
        + SMUGGLE,
    "bare-lf-line-endings": b"GET /a HTTP/1.1\n" + b"Host: x\n\n",
    "bare-lf-in-headers": b"GET /a HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",
    "obsolete-line-folding": b"GET /a HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n",
    "plus-sign-length": b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
    "underscore-length": b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 1_0\r\n\r\nhelloworld",
    "long-request-line": b"GET /a?" + b"q" * 20_000 + b" HTTP/1.1\r\n" + H + b"\r\n",
    "long-header-block":
        b"GET /a HTTP/1.1\r\n" + H + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000)
                                              for i in range(90)) + b"\r\n",
    "too-many-headers":
        b"GET /a HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n",
}
EXPECTED_STATUS = {"long-request-line": 414, "long-header-block": 431, "too-many-headers": 431}


@pytest.mark.parametrize("attack", sorted(REFUSED))
def test_malformed_and_ambiguous_requests_are_refused_and_never_reach_the_app(target, attack):
    received = exchange(target.port, REFUSED[attack].replace(b" /a", b" /a-" + attack.encode()))
    answered = statuses(received)
    assert set(answered) <= {400, 414, 431}, (attack, received[:300])
    assert len(answered) <= 1  # never a second response on the connection
    if attack in EXPECTED_STATUS:
        assert answered == [EXPECTED_STATUS[attack]], received[:300]
    settle(target, attack)
    assert not target.saw("POST", f"/a-{attack}") and not target.saw("GET", f"/a-{attack}")
    assert "/smuggled" not in target.output()


def test_a_header_value_with_cr_lf_set_by_the_app_is_never_sent(target):
    received = exchange(target.port, b"GET /crlf HTTP/1.1\r\n" + H + b"\r\n")
    assert b"injected" not in received
    assert set(statuses(received)) <= {500}  # a 500 or a closed connection, never the header


def test_a_body_longer_than_the_apps_content_length_is_never_sent_past_it(target):
    received = exchange(target.port, b"GET /long HTTP/1.1\r\n" + H + b"\r\n"
                        b"GET /next HTTP/1.1\r\n" + H + b"\r\n")
    assert b"smuggled" not in received
    assert statuses(received)[:1] == [200] and received.count(b"HTTP/1.1 200") <= 2
    assert b"HTTP/1.1 200 OK\r\nContent-Length: 8" not in received


def test_underscore_header_names_are_dropped_not_merged(target):
    received = exchange(target.port, b"GET /xff HTTP/1.1\r\n" + H
                        + b"X-Forwarded-For: 10.0.0.1\r\nX_Forwarded_For: 6.6.6.6\r\n"
                          b"Connection: close\r\n\r\n")
    assert statuses(received) == [200]
    wait_until(lambda: target.saw("GET", "/xff"), 10, message="the request to be seen")
    if "wsgi" in target.flavor:  # type: ignore[attr-defined]
        assert "seen GET /xff 0 xff=10.0.0.1\n" in target.output()  # not "10.0.0.1,6.6.6.6"


@pytest.mark.parametrize("cut", ["head", "body"])
def test_truncated_requests_never_reach_the_app(target, cut):
    data = (b"GET /trunc-head HTTP/1.1\r\n" + H + b"X-A: b\r\n" if cut == "head"
            else b"POST /trunc-body HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nhello")
    assert exchange(target.port, data, half_close=True) == b""  # no answer at all
    settle(target, f"trunc-{cut}")
    assert not target.saw("GET", "/trunc-head") and not target.saw("POST", "/trunc-body")


def test_a_pipelined_valid_request_is_still_served(target):
    received = exchange(target.port, b"POST /ok HTTP/1.1\r\n" + H + b"Content-Length: 2\r\n\r\nhi"
                        + b"GET /ok2 HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert statuses(received) == [200, 200], received


# -- slow clients, streams, the preStop drain (a fresh service each) ------------------------


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes ``sock`` within ``seconds`` (whatever it sends first)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_request_head_that_never_arrives_whole_is_closed_at_its_deadline(flavor):
    # uvicorn times the idle gap after a response only, and the first byte of a head stops
    # that clock: these three connections were held open for ever (a descriptor each).
    needs(flavor)
    target = Target(flavor, env={"SHUTDOWN_APPS_HEAD_TIMEOUT": "1"})
    try:
        target.wait_ready()
        silent = socket.create_connection(("127.0.0.1", target.port), timeout=10)
        partial = socket.create_connection(("127.0.0.1", target.port), timeout=10)
        partial.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        reused = socket.create_connection(("127.0.0.1", target.port), timeout=10)
        reused.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"\r\n\r\nok"):
            answer += reused.recv(65536)
        reused.sendall(b"GET /second HTTP/1.1\r\n")  # then nothing more
        for name, sock in (("silent", silent), ("partial head", partial),
                           ("second head", reused)):
            with sock:
                assert closed_within(sock, 1 + MARGIN), f"{name} connection still open"
        # Whole requests are unaffected, a slow one included (its head came in time).
        assert get(target.port, "/slow")[0] == 200
        assert target.saw("GET", "/first") and not target.saw("GET", "/second")
    finally:
        target.close()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_slowloris_connections_do_not_hold_the_drain(flavor):
    needs(flavor)
    from test_shutdown_lifecycle import service

    with service(flavor, 10, "--drain-delay", "0.2", "--drain-timeout", "20") as svc:
        slow = []
        for _ in range(3):  # heads that never end
            sock = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
            sock.sendall(b"GET /work HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(sock)
        assert get(svc.port, "/work")[0] == 200
        sigterm = svc.signal(signal.SIGTERM)
        code = svc.wait(20)
        elapsed = time.monotonic() - sigterm
        for sock in slow:
            sock.close()
        assert code == 0, svc.output()
        assert elapsed < 0.2 + MARGIN, f"exit took {elapsed:.1f}s"
        assert svc.cut() == 0


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_server_sent_event_stream_ends_itself_when_the_drain_begins(flavor):
    needs(flavor)
    from test_shutdown_lifecycle import service

    with service(flavor, 10, "--drain-delay", "0.3", "--drain-timeout", "20") as svc:
        with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as sock:
            sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while received.count(b"data: tick") < 2:
                received += sock.recv(4096)
            sigterm = svc.signal(signal.SIGTERM)
            while chunk := sock.recv(4096):  # the server ends the stream and closes
                received += chunk
        assert b"text/event-stream" in received
        assert received.rstrip().endswith(b"event: bye\r\ndata: draining") or \
            b"event: bye\ndata: draining" in received, received[-200:]
        code = svc.wait(20)
        assert code == 0, svc.output()
        assert time.monotonic() - sigterm < 0.3 + MARGIN  # not the 20 s drain timeout
        assert svc.cut() == 0


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize(("work_ms", "expected"), [(300, 0), (20_000, 3)])
def test_the_prestop_drain_returns_when_work_is_done_or_cut(flavor, work_ms, expected):
    needs(flavor)
    from test_shutdown_lifecycle import service

    # One gunicorn worker: the drain endpoint reports the worker that answers it.
    with service(flavor, work_ms, "--drain-delay", "0.3", "--drain-timeout", "1",
                 "--workers", "1") as svc, ThreadPoolExecutor(2) as pool:
        work = [pool.submit(get, svc.port, "/work", 30.0) for _ in range(2)]
        wait_until(lambda: svc.seen("/work") == 2, 20, message="2 requests in flight")
        started = time.monotonic()
        hook = subprocess.run([sys.executable, "-m", "buttress", "drain", "--port",
                               str(svc.port)], capture_output=True, text=True, timeout=30)
        took = time.monotonic() - started
        assert hook.returncode == expected, hook.stderr
        report = json.loads(hook.stdout)
        assert report["drained"] is (expected == 0)
        assert report["requests_aborted"] == (0 if expected == 0 else 2)
        assert took >= 0.3 * 0.9  # the delay was served before the listener closed
        assert refuses_connections(svc.port) or svc.process.poll() is not None
        assert [future.result(timeout=10)[0] for future in work] == (
            [200, 200] if expected == 0 else [503, 503])
        # The service stops on its own (under gunicorn: the master was asked to).
        assert svc.wait(10) == expected, svc.output()


def test_the_drain_endpoint_refuses_requests_from_outside_the_pod():
    from buttress.shutdown import ASGIMiddleware, GracefulShutdown

    controller = GracefulShutdown()
    middleware = ASGIMiddleware(lambda scope, receive, send: None, controller)
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    import asyncio

    scope = {"type": "http", "method": "POST", "path": "/drainz", "client": ("10.1.2.3", 5000)}
    asyncio.run(middleware(scope, None, send))  # type: ignore[arg-type]
    assert sent[0]["status"] == 403 and not controller.draining


def test_the_drain_command_reports_a_service_that_is_not_there():
    hook = subprocess.run([sys.executable, "-m", "buttress", "drain", "--port",
                           str(free_port()), "--timeout", "2"], capture_output=True, text=True,
                          timeout=30)
    assert hook.returncode == 1 and "could not drain" in hook.stderr
    bad = subprocess.run([sys.executable, "-m", "buttress", "drain", "--port", "http"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--port" in bad.stderr


# -- gunicorn: bad settings are refused before anything is served --------------------------


def gunicorn(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("gunicorn")
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{free_port()}",
         "--chdir", str(APPS.parent), *args, "shutdown_apps:make_wsgi_app()"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("args", "env", "named"), [
    (["-k", "buttress.shutdown.gunicorn.WSGIWorker"], {}, "buttress.shutdown.gunicorn_conf"),
    (["-c", "python:buttress.shutdown.gunicorn_conf", "-k", "sync"], {}, "worker_class 'sync'"),
    (["-c", "python:buttress.shutdown.gunicorn_conf", "--graceful-timeout", "5"], {},
     "graceful_timeout=5 is shorter"),
    (["-c", "python:buttress.shutdown.gunicorn_conf", "--graceful-timeout", "60"],
     {"BUTTRESS_GRACE_PERIOD": "30"}, "graceful_timeout=60 is longer"),
    (["-c", "python:buttress.shutdown.gunicorn_conf"], {"BUTTRESS_DRAIN_DELAY": "soon"},
     "BUTTRESS_DRAIN_DELAY"),
])
def test_gunicorn_settings_that_do_not_fit_are_refused_by_name(args, env, named):
    done = gunicorn(*args, env=env)
    assert done.returncode != 0
    assert named in done.stderr, done.stderr
    assert "Booting worker" not in done.stderr  # refused before any worker served


def test_the_gunicorn_config_derives_graceful_timeout_from_the_budget():
    from buttress.shutdown import ShutdownBudget
    from buttress.shutdown.gunicorn import graceful_timeout_for

    budget = ShutdownBudget.from_env({"BUTTRESS_GRACE_PERIOD": "30", "BUTTRESS_PRE_STOP": "5"})
    assert graceful_timeout_for(budget) == 25
    done = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "python:buttress.shutdown.gunicorn_conf",
         "--print-config", "--chdir", str(APPS.parent), "shutdown_apps:make_wsgi_app()"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "BUTTRESS_GRACE_PERIOD": "30", "BUTTRESS_PRE_STOP": "5"})
    assert re.search(r"^graceful_timeout += 25$", done.stdout, re.MULTILINE), done.stdout
    assert "buttress.shutdown.gunicorn.WSGIWorker" in done.stdout
