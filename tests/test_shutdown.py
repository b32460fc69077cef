"""buttress.shutdown in-process: the budget, the controller, signals, hooks, the WSGI server.

Servers here are real (real sockets, real threads, real HTTP); the controller
runs on a helper thread with ``handle_signals=False`` and is told to drain by
``begin_drain()``.  Real signals to a real child process are in
test_shutdown_lifecycle.py.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import buttress
from buttress.shutdown import (
    ExitCode,
    GracefulShutdown,
    PortInUseError,
    ProbePaths,
    ShutdownBudget,
    State,
    WSGIMiddleware,
    WSGIServer,
)
from conftest import wait_until

# -- the budget -----------------------------------------------------------------


def test_the_default_split_of_a_grace_period_fits_it_with_a_margin():
    budget = ShutdownBudget.from_grace_period(30)
    assert budget.grace_period == pytest.approx(30)
    assert budget.margin == 3 and budget.drain_delay == 5 and budget.cleanup == 3
    assert budget.drain_timeout == pytest.approx(19)


def test_pre_stop_time_is_taken_off_before_the_split():
    budget = ShutdownBudget.from_grace_period(30, pre_stop=5, drain_delay=2)
    assert budget.pre_stop == 5 and budget.drain_delay == 2
    assert budget.grace_period == pytest.approx(30)
    assert budget.drain_timeout == pytest.approx(30 - 5 - 2 - 2.5 - 2.5)


@pytest.mark.parametrize("grace", [0.6, 1, 3, 7.5, 30, 120, 3600])
def test_every_split_is_non_negative_and_sums_to_the_grace_period(grace):
    budget = ShutdownBudget.from_grace_period(grace)
    parts = [budget.drain_delay, budget.drain_timeout, budget.cleanup, budget.margin]
    assert all(part >= 0 for part in parts)
    assert math.isclose(sum(parts), grace)


def test_parts_that_do_not_fit_the_grace_period_are_rejected():
    with pytest.raises(ValueError, match="exceed"):
        ShutdownBudget.from_grace_period(10, drain_timeout=20)
    with pytest.raises(ValueError, match="exceed"):
        ShutdownBudget.from_grace_period(10, drain_delay=9, cleanup=5)
    with pytest.raises(ValueError, match="pre_stop"):
        ShutdownBudget.from_grace_period(10, pre_stop=10)


@pytest.mark.parametrize("name", ["drain_delay", "drain_timeout", "cleanup", "margin", "pre_stop"])
@pytest.mark.parametrize("value", [-1, -0.001, "soon", float("nan"), float("inf"), True, None, []])
def test_negative_or_non_numeric_timeouts_raise_value_error_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        ShutdownBudget(**{name: value})


def test_numeric_strings_are_accepted_as_from_an_environment():
    assert ShutdownBudget(drain_delay="1.5").drain_delay == 1.5  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grace_period"):
        ShutdownBudget.from_grace_period("thirty")


def test_from_env_reads_the_grace_period_and_the_pre_stop_sleep():
    env = {"BUTTRESS_GRACE_PERIOD": "30", "BUTTRESS_PRE_STOP": "5"}
    assert ShutdownBudget.from_env(env) == ShutdownBudget.from_grace_period(30, pre_stop=5)
    assert ShutdownBudget.from_env({}) == ShutdownBudget()
    assert ShutdownBudget.from_env({}, drain_delay=1).drain_delay == 1
    with pytest.raises(ValueError, match="BUTTRESS_GRACE_PERIOD='-3'"):
        ShutdownBudget.from_env({"BUTTRESS_GRACE_PERIOD": "-3"})


# -- the controller ----------------------------------------------------------------


def test_the_lifecycle_moves_forward_and_the_probes_follow_it():
    controller = GracefulShutdown()
    assert controller.state is State.STARTING
    assert controller.probe("/readyz")[0] == 503  # not before startup completes
    assert controller.probe("/livez")[0] == 200
    controller.mark_ready()
    assert controller.probe("/readyz")[0] == 200
    controller.request_started()
    assert controller.begin_drain("test") is True
    assert controller.begin_drain("again") is False
    controller.mark_ready()  # cannot go back
    assert controller.state is State.DRAINING
    assert controller.probe("/readyz")[0] == 503
    assert controller.probe("/livez")[0] == 200  # liveness stays true while draining
    status, content_type, body = controller.probe("/drainz")
    report = json.loads(body)
    assert status == 200 and content_type == "application/json"
    assert report["state"] == "draining" and report["in_flight"] == 1
    assert 0 <= report["draining_for"] < 5
    assert controller.probe("/work") is None
    assert controller.stats()["drain_reason"] == "test"


def test_request_counting_is_exact_across_threads_and_reads():
    # Counting takes no lock (see GracefulShutdown.__init__): check it loses nothing.
    controller = GracefulShutdown()
    threads, per_thread = 8, 5_000
    barrier = threading.Barrier(threads)

    def requests() -> None:
        barrier.wait()
        for _ in range(per_thread):
            controller.request_started()
            controller.request_finished()

    workers = [threading.Thread(target=requests) for _ in range(threads)]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        assert 0 <= controller.in_flight <= threads
        controller.stats()  # reading the total while requests are counted
    for worker in workers:
        worker.join()
    assert controller.in_flight == 0
    assert controller.stats()["requests_total"] == threads * per_thread
    assert controller.stats()["requests_total"] == threads * per_thread  # reads add nothing
    controller.request_started()
    controller.request_finished(aborted=True)
    stats = controller.stats()
    assert stats["requests_total"] == threads * per_thread + 1
    assert stats["requests_aborted"] == 1 and stats["in_flight"] == 0


def test_probe_paths_are_configurable_and_validated():
    controller = GracefulShutdown(probe_paths=ProbePaths(live="/health", ready="/ready",
                                                         drain="/drain"))
    assert controller.probe("/health")[0] == 200 and controller.probe("/livez") is None
    with pytest.raises(ValueError, match="live"):
        ProbePaths(live="health")
    with pytest.raises(ValueError, match="differ"):
        ProbePaths(live="/x", ready="/x")


@pytest.mark.parametrize("code", [0, 256, -1, True, "3"])
def test_exit_codes_must_be_distinct_non_zero_codes(code):
    with pytest.raises(ValueError, match="drain_timeout_exit_code"):
        GracefulShutdown(drain_timeout_exit_code=code)


def test_cleanup_hooks_run_newest_first_and_failures_are_reported():
    controller = GracefulShutdown()
    order: list[str] = []
    controller.add_cleanup(lambda: order.append("redis"), name="redis")
    controller.add_cleanup(lambda: order.append("scheduler"), name="scheduler")
    assert controller.run_cleanup(5) is True
    assert order == ["scheduler", "redis"]

    controller.add_cleanup(lambda: 1 / 0, name="broken")
    assert controller.run_cleanup(5) is False
    report = controller.stats()["cleanup"][-1]
    assert report["name"] == "broken" and not report["ok"]
    assert "ZeroDivisionError" in report["detail"]


def test_a_hook_that_overruns_its_budget_is_left_behind_on_time():
    controller = GracefulShutdown()
    release = threading.Event()
    controller.add_cleanup(lambda: release.wait(30), name="stuck", timeout=0.2)
    ran = []
    controller.add_cleanup(lambda: ran.append(1), name="first")
    started = time.monotonic()
    try:
        assert controller.run_cleanup(5) is False
    finally:
        release.set()
    assert time.monotonic() - started < 3
    assert ran == [1]
    assert "overran" in controller.stats()["cleanup"][-1]["detail"]
    with pytest.raises(ValueError, match="timeout"):
        controller.add_cleanup(print, timeout=-1)
    with pytest.raises(ValueError, match="callable"):
        controller.add_cleanup("not a function")  # type: ignore[arg-type]


# -- signals (in this process: only the handler's effect, never a process exit) ------


def test_signal_handlers_are_installed_from_the_main_thread_only():
    controller = GracefulShutdown()
    errors: list[BaseException] = []

    def install() -> None:
        try:
            controller.install_signal_handlers()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=install, name="not-main")
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0]) and "not-main" in str(errors[0])


def test_sigterm_begins_a_drain_and_the_previous_handlers_come_back():
    seen: list[int] = []

    def previous(signum: int, frame: Any) -> None:
        seen.append(signum)

    old_term = signal.signal(signal.SIGTERM, previous)
    old_int = signal.getsignal(signal.SIGINT)
    try:
        controller = GracefulShutdown()
        with controller.signal_handlers():
            assert signal.getsignal(signal.SIGTERM) != previous
            os.kill(os.getpid(), signal.SIGTERM)
            wait_until(lambda: controller.draining, 5, message="SIGTERM to start the drain")
        assert controller.stats()["drain_reason"] == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is old_int
        os.kill(os.getpid(), signal.SIGTERM)
        wait_until(lambda: seen == [signal.SIGTERM], 5, message="the old handler to run again")
    finally:
        signal.signal(signal.SIGTERM, old_term)


# -- the WSGI server ---------------------------------------------------------------


def hello_app(environ: dict[str, Any], start_response: Any) -> Any:
    path = environ["PATH_INFO"]
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (part for part in (b"one,", b"", b"two"))
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    if path == "/boom":
        raise RuntimeError("boom")
    if path == "/slow":
        time.sleep(0.05)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


@contextmanager
def running(app: Any = hello_app, budget: ShutdownBudget | None = None
            ) -> Iterator[tuple[WSGIServer, GracefulShutdown, list[int]]]:
    """A WSGIServer driven by a controller on a helper thread; the exit code lands in a list."""
    controller = GracefulShutdown(budget or ShutdownBudget(drain_delay=0, drain_timeout=5))
    server = WSGIServer(WSGIMiddleware(app, controller), host="127.0.0.1", port=0)
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(controller.run(server, handle_signals=False)), daemon=True)
    thread.start()
    wait_until(lambda: controller.state is State.READY, 10, message="server ready")
    try:
        yield server, controller, codes
    finally:
        controller.begin_drain("test over")
        thread.join(15)


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, body=body)
    response = conn.getresponse()
    data = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def test_keep_alive_streaming_head_bodies_and_errors():
    with running() as (server, _, _):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        status, headers, body = request(conn, "GET", "/")
        assert (status, body, headers["content-length"]) == (200, b"hello", "5")
        first_socket = conn.sock
        status, headers, body = request(conn, "GET", "/stream")
        assert (status, body, headers["transfer-encoding"]) == (200, b"one,two", "chunked")
        status, headers, body = request(conn, "HEAD", "/")
        assert (status, body, headers["content-length"]) == (200, b"", "5")
        status, _, body = request(conn, "POST", "/echo", body=b"x" * 10_000)
        assert (status, body) == (200, b"x" * 10_000)
        assert conn.sock is first_socket  # one connection served all of them
        assert server.stats()["connections_total"] == 1
        status, headers, _ = request(conn, "GET", "/boom")
        assert status == 500 and headers["connection"] == "close"


def test_a_chunked_request_body_gets_411():
    with running() as (server, _, _), socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 411")


def test_a_taken_port_raises_port_in_use_naming_the_port():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} is already in use"):
            WSGIServer(hello_app, host="127.0.0.1", port=port)
    with pytest.raises(ValueError, match="port"):
        WSGIServer(hello_app, port=70000)


def test_stop_accepting_refuses_new_connections_and_closes_idle_ones():
    with running() as (server, controller, codes):
        idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        assert request(idle, "GET", "/")[0] == 200
        wait_until(lambda: server.stats()["idle"] == 1, 5, message="the connection to idle")
        controller.begin_drain("test")
        wait_until(lambda: codes, 10, message="the drain to finish")
        assert codes == [ExitCode.CLEAN]
        assert idle.sock is not None and idle.sock.recv(1) == b""
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2)
        assert server.stats()["idle_closed"] == 1


def test_a_request_racing_the_close_of_idle_connections_is_answered_whole_or_refused_clean():
    # The race the connection states defend against: a request arrives on an idle keep-alive
    # connection just as the drain closes idle ones.  Whatever the interleaving, the client
    # gets either the whole answer (with Connection: close) or a close before any byte of a
    # response, which HTTP clients retry; never a torn response, never a hang.
    outcomes = {"answered": 0, "refused": 0}
    for _ in range(25):
        controller = GracefulShutdown()
        server = WSGIServer(WSGIMiddleware(hello_app, controller), host="127.0.0.1", port=0)
        server.start()
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert b"hello" in s.recv(4096)  # served; the connection is idle now
                controller.begin_drain("race")
                s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
                server._close_idle_connections()  # at once: its thread may not have woken
                reply = b""
                try:
                    while chunk := s.recv(4096):
                        reply += chunk
                except ConnectionResetError:
                    assert reply == b""
            if reply:
                assert reply.startswith(b"HTTP/1.1 200"), reply
                assert b"Connection: close" in reply and reply.endswith(b"hello")
                outcomes["answered"] += 1
            else:
                outcomes["refused"] += 1
            assert server.wait_idle(10)
        finally:
            server.stop_accepting()
            server.close(5)
    assert sum(outcomes.values()) == 25, outcomes


def test_a_request_already_read_when_the_drain_starts_is_answered():
    # Once the connection's thread has the request, the drain leaves the connection alone.
    arrived = threading.Event()
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        arrived.set()
        release.wait(10)
        start_response("200 OK", [])
        return [b"answered"]

    controller = GracefulShutdown()
    server = WSGIServer(WSGIMiddleware(app, controller), host="127.0.0.1", port=0)
    server.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/")
        assert arrived.wait(10)
        controller.begin_drain("test")
        server.stop_accepting()
        assert server.stats()["idle_closed"] == 0
        release.set()
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"answered")
        assert response.getheader("Connection") == "close"
        assert server.wait_idle(10)
    finally:
        release.set()
        server.close(5)


def test_the_drain_deadline_cuts_what_is_left_and_the_exit_code_says_so():
    release = threading.Event()

    def stuck_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        release.wait(30)
        start_response("200 OK", [])
        return [b"late"]

    try:
        with running(stuck_app, ShutdownBudget(drain_delay=0, drain_timeout=0.3)) as (
                server, controller, codes):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", "/")
            wait_until(lambda: controller.in_flight == 1, 5, message="request in flight")
            controller.begin_drain("test")
            with pytest.raises((OSError, http.client.HTTPException)):
                conn.getresponse().read()
            wait_until(lambda: codes, 10, message="the drain to finish")
            assert codes == [ExitCode.DRAIN_TIMED_OUT]
            assert server.stats()["aborted"] == 1
            assert controller.stats()["drained"] is False
    finally:
        release.set()


def test_public_names_are_importable_from_the_top_level():
    assert buttress.GracefulShutdown is GracefulShutdown
    assert buttress.ShutdownBudget is ShutdownBudget


# -- the Kubernetes manifests agree with the budget ----------------------------------

DEPLOYMENT = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "deployment.yaml"


def _yaml_value(text: str, pattern: str) -> str:
    found = re.findall(pattern, text, flags=re.MULTILINE)
    assert len(found) == 1, f"{pattern!r} found {len(found)} times in {DEPLOYMENT.name}"
    return str(found[0])


def test_the_deployment_budget_adds_up_to_its_grace_period():
    text = DEPLOYMENT.read_text()
    grace = float(_yaml_value(text, r"^\s+terminationGracePeriodSeconds: (\d+)"))
    pre_stop = float(_yaml_value(text, r"^\s+sleep:\n\s+seconds: (\d+)"))
    env = {
        name: _yaml_value(text, name + r"\n\s+value: \"(\d+)\"")
        for name in ("BUTTRESS_GRACE_PERIOD", "BUTTRESS_PRE_STOP")
    }
    assert float(env["BUTTRESS_GRACE_PERIOD"]) == grace
    assert float(env["BUTTRESS_PRE_STOP"]) == pre_stop
    drain_delay = _yaml_value(text, r"\"--drain-delay\", \"([\d.]+)\"")
    budget = ShutdownBudget.from_env(env, drain_delay=drain_delay)
    assert budget.grace_period == pytest.approx(grace)
    assert budget.pre_stop == pre_stop and budget.margin >= 1 and budget.drain_timeout >= 10
    probes = ProbePaths()
    assert _yaml_value(text, r"readinessProbe:\n(?:.*\n){0,2}\s+path: (\S+)") == probes.ready
    assert _yaml_value(text, r"livenessProbe:\n(?:.*\n){0,2}\s+path: (\S+)") == probes.live


def test_a_drain_before_startup_completes_skips_the_delay():
    controller = GracefulShutdown(ShutdownBudget(drain_delay=30, drain_timeout=5))
    server = WSGIServer(WSGIMiddleware(hello_app, controller), host="127.0.0.1", port=0)
    controller.begin_drain("stopped while starting")
    started = time.monotonic()
    assert controller.run(server, handle_signals=False) == ExitCode.CLEAN
    assert time.monotonic() - started < 10
    assert controller.state is State.STOPPED
    with pytest.raises(RuntimeError, match="once"):
        controller.run(server, handle_signals=False)


# -- the ASGI flavor in-process ---------------------------------------------------------


async def echo_path_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = scope["path"].encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def test_asgi_middleware_and_driver_in_process():
    from buttress.shutdown import ASGIMiddleware, ASGIServer

    controller = GracefulShutdown(ShutdownBudget(drain_delay=0, drain_timeout=5))
    server = ASGIServer(ASGIMiddleware(echo_path_app, controller), host="127.0.0.1", port=0)
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(controller.run(server, handle_signals=False)), daemon=True)
    thread.start()
    try:
        wait_until(lambda: controller.state is State.READY, 20, message="uvicorn ready")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        assert request(conn, "GET", "/hello")[::2] == (200, b"/hello")
        assert request(conn, "GET", "/readyz")[0] == 200
        report = json.loads(request(conn, "GET", "/drainz")[2])
        assert report == {"state": "ready", "in_flight": 0, "draining_for": None,
                          "requests_aborted": 0}
        assert controller.stats()["requests_total"] == 1  # probes are not counted
        with socket.create_server(("127.0.0.1", 0)) as taken, pytest.raises(
                PortInUseError, match=f"port {taken.getsockname()[1]} is already in use"):
            ASGIServer(echo_path_app, host="127.0.0.1", port=taken.getsockname()[1])
        controller.begin_drain("test")
        wait_until(lambda: codes, 15, message="the drain to finish")
        assert codes == [ExitCode.CLEAN]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2)
    finally:
        controller.begin_drain("test over")
        thread.join(15)
