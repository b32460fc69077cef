"""buttress.shutdown in-process: the budget, the controller, signals, hooks, the servers.

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
from concurrent.futures import ThreadPoolExecutor
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
@pytest.mark.parametrize("value", [-1, -0.001, float("nan"), float("inf")])
def test_negative_or_infinite_timeouts_raise_value_error_naming_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        ShutdownBudget(**{name: value})


@pytest.mark.parametrize("name", ["drain_delay", "drain_timeout", "cleanup", "margin", "pre_stop"])
@pytest.mark.parametrize("value", ["soon", "1.5", True, None, []])
def test_timeouts_of_the_wrong_type_raise_type_error_naming_the_argument(name, value):
    with pytest.raises(TypeError, match=name):
        ShutdownBudget(**{name: value})


def test_numeric_strings_are_accepted_only_from_the_environment():
    with pytest.raises(TypeError, match="grace_period"):
        ShutdownBudget.from_grace_period("30")  # type: ignore[arg-type]
    budget = ShutdownBudget.from_env({"BUTTRESS_DRAIN_DELAY": "1.5", "BUTTRESS_DRAIN_TIMEOUT": "4"})
    assert (budget.drain_delay, budget.drain_timeout) == (1.5, 4)
    with pytest.raises(ValueError, match="BUTTRESS_DRAIN_DELAY"):
        ShutdownBudget.from_env({"BUTTRESS_DRAIN_DELAY": "soon"})


def test_from_env_reads_the_grace_period_and_the_pre_stop_time():
    env = {"BUTTRESS_GRACE_PERIOD": "30", "BUTTRESS_PRE_STOP": "5"}
    assert ShutdownBudget.from_env(env) == ShutdownBudget.from_grace_period(30, pre_stop=5)
    assert ShutdownBudget.from_env({}) == ShutdownBudget()
    assert ShutdownBudget.from_env({}, drain_delay=1).drain_delay == 1
    assert ShutdownBudget.from_env({"BUTTRESS_DRAIN_DELAY": "3"}, drain_delay=1).drain_delay == 1
    with pytest.raises(ValueError, match="BUTTRESS_GRACE_PERIOD"):
        ShutdownBudget.from_env({"BUTTRESS_GRACE_PERIOD": "-3"})
    with pytest.raises(ValueError, match="BUTTRESS_GRACE_PERIOD='30'"):
        ShutdownBudget.from_env({"BUTTRESS_GRACE_PERIOD": "30"}, drain_timeout=40)


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
    with pytest.raises(TypeError, match="live"):
        ProbePaths(live=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ"):
        ProbePaths(live="/x", ready="/x")


@pytest.mark.parametrize(("code", "error"), [(0, ValueError), (256, ValueError),
                                             (-1, ValueError), (True, TypeError),
                                             ("3", TypeError)])
def test_exit_codes_must_be_non_zero_codes(code, error):
    with pytest.raises(error, match="drain_timeout_exit_code"):
        GracefulShutdown(drain_timeout_exit_code=code)


def test_controller_arguments_are_checked_by_type():
    with pytest.raises(TypeError, match="budget"):
        GracefulShutdown(budget=30)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="force_signals"):
        GracefulShutdown(force_signals=("INT",))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="controller"):
        WSGIMiddleware(lambda e, s: [], controller=None)  # type: ignore[arg-type]


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
    with pytest.raises(TypeError, match="hook must be callable"):
        controller.add_cleanup(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name"):
        controller.add_cleanup(print, name=3)  # type: ignore[arg-type]


# -- the drain signal: streams end themselves ------------------------------------------


def test_the_drain_signal_is_a_flag_a_thread_wait_and_an_awaitable():
    import asyncio

    controller = GracefulShutdown()
    signal_ = controller.draining
    assert not signal_ and not signal_.is_set()
    assert signal_.wait(0.05) is False
    woken: list[str] = []

    async def stream() -> None:
        await signal_
        woken.append("awaited")

    def run_loop() -> None:
        asyncio.run(asyncio.wait_for(stream(), 10))

    def thread_wait() -> None:
        if signal_.wait(10):
            woken.append("thread")

    waiters = [threading.Thread(target=run_loop), threading.Thread(target=thread_wait)]
    for waiter in waiters:
        waiter.start()
    wait_until(lambda: len(signal_._waiters) == 1, 5, message="the coroutine to wait")
    controller.begin_drain("test")
    for waiter in waiters:
        waiter.join(10)
    assert sorted(woken) == ["awaited", "thread"]
    assert signal_ and signal_.wait(0) is True
    assert asyncio.run(signal_.wait_async()) is True  # already set: returns at once


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


# -- the servers in-process -----------------------------------------------------------


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
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


@contextmanager
def running(app: Any = hello_app, budget: ShutdownBudget | None = None, **options: Any
            ) -> Iterator[tuple[WSGIServer, GracefulShutdown, list[int]]]:
    """A WSGIServer driven by a controller on a helper thread; the exit code lands in a list."""
    controller = GracefulShutdown(budget or ShutdownBudget(drain_delay=0, drain_timeout=5))
    server = WSGIServer(WSGIMiddleware(app, controller, **options), host="127.0.0.1", port=0)
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(controller.run(server, handle_signals=False)), daemon=True)
    thread.start()
    wait_until(lambda: controller.state is State.READY, 20, message="server ready")
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


def test_wsgi_keep_alive_streaming_head_bodies_and_errors():
    with running() as (server, controller, _):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        status, headers, body = request(conn, "GET", "/")
        assert (status, body) == (200, b"hello")
        first_socket = conn.sock
        status, headers, body = request(conn, "GET", "/stream")
        assert (status, body, headers["transfer-encoding"]) == (200, b"one,two", "chunked")
        status, headers, body = request(conn, "HEAD", "/")
        assert (status, body) == (200, b"")
        status, _, body = request(conn, "POST", "/echo", body=b"x" * 10_000)
        assert (status, body) == (200, b"x" * 10_000)
        conn.putrequest("POST", "/echo")  # a chunked request body works too (uvicorn)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders(b"3\r\nabc\r\n0\r\n\r\n")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"abc")
        assert conn.sock is first_socket  # one connection served all of them
        status, headers, _ = request(conn, "GET", "/boom")
        assert status == 500
        assert controller.stats()["requests_total"] == 6
        assert server.stats()["threads"]["max"] == 32


def test_a_taken_port_raises_port_in_use_naming_the_port():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} is already in use"):
            WSGIServer(hello_app, host="127.0.0.1", port=port)
    with pytest.raises(ValueError, match="port"):
        WSGIServer(hello_app, port=70000)
    with pytest.raises(TypeError, match="threads"):
        WSGIServer(hello_app, port=0, threads="8")


def test_stop_accepting_refuses_new_connections_and_closes_idle_ones():
    with running() as (server, controller, codes):
        idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        assert request(idle, "GET", "/")[0] == 200
        controller.begin_drain("test")
        wait_until(lambda: codes, 10, message="the drain to finish")
        assert codes == [ExitCode.CLEAN]
        assert idle.sock is not None and idle.sock.recv(1) == b""
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2)


def test_a_request_already_read_when_the_drain_starts_is_answered():
    arrived = threading.Event()
    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        arrived.set()
        release.wait(10)
        start_response("200 OK", [])
        return [b"answered"]

    try:
        with running(app) as (server, controller, codes):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", "/")
            assert arrived.wait(10)
            controller.begin_drain("test")
            wait_until(lambda: refused(server.port), 10, message="the listener to close")
            release.set()
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, b"answered")
            assert response.getheader("Connection") == "close"
            wait_until(lambda: codes, 10, message="the drain to finish")
            assert codes == [ExitCode.CLEAN]
    finally:
        release.set()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_drain_deadline_cuts_what_is_left_counts_it_and_the_exit_code_says_so():
    release = threading.Event()

    def stuck_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        release.wait(30)
        start_response("200 OK", [])
        return [b"late"]

    try:
        with running(stuck_app, ShutdownBudget(drain_delay=0, drain_timeout=0.3)) as (
                server, controller, codes):
            conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                     for _ in range(2)]
            for conn in conns:
                conn.request("GET", "/")
            wait_until(lambda: controller.in_flight == 2, 5, message="requests in flight")
            controller.begin_drain("test")
            for conn in conns:  # not started: answered 503 with Connection: close
                response = conn.getresponse()
                assert response.status == 503 and response.getheader("connection") == "close"
            wait_until(lambda: codes, 10, message="the drain to finish")
            assert codes == [ExitCode.DRAIN_TIMED_OUT]
            stats = controller.stats()
            assert stats["requests_aborted"] == 2 and stats["drained"] is False
            assert controller.drain_status()["requests_aborted"] == 2
    finally:
        release.set()


def test_metrics_are_served_from_a_prometheus_registry_and_not_counted():
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("hello_total", "hellos", registry=registry)
    counter.inc(3)
    with running(metrics_registry=registry) as (server, controller, _):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        status, headers, body = request(conn, "GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert b"hello_total 3.0" in body
        assert controller.stats()["requests_total"] == 0
    without = WSGIMiddleware(hello_app, GracefulShutdown())  # no registry: the app's path
    seen: list[str] = []
    assert list(without({"PATH_INFO": "/metrics"}, lambda s, h, e=None: seen.append(s))) == [
        b"hello"]


def test_the_prestop_drain_answers_when_requests_are_done():
    from buttress.shutdown.drain import drain

    release = threading.Event()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        release.wait(10)
        start_response("200 OK", [])
        return [b"done"]

    budget = ShutdownBudget(drain_delay=0.2, drain_timeout=10)
    try:
        with running(app, budget) as (server, controller, codes), \
                ThreadPoolExecutor(2) as pool:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("GET", "/")
            wait_until(lambda: controller.in_flight == 1, 5, message="a request in flight")
            report = pool.submit(drain, server.port, timeout=20)
            wait_until(lambda: controller.draining, 5, message="the drain to begin")
            time.sleep(0.5)  # past the delay: the drain waits for the request, not the clock
            assert not report.done()
            release.set()
            assert conn.getresponse().status == 200
            result = report.result(timeout=10)
            assert result["drained"] is True and result["requests_aborted"] == 0
            wait_until(lambda: codes, 10, message="the service to stop")
            assert codes == [ExitCode.CLEAN]
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
    env = {
        name: _yaml_value(text, name + r"\n\s+value: \"(\d+)\"")
        for name in ("BUTTRESS_GRACE_PERIOD", "BUTTRESS_PRE_STOP")
    }
    assert float(env["BUTTRESS_GRACE_PERIOD"]) == grace
    # The preStop hook is the blocking drain of this very service, not a sleep: it runs
    # inside the budget, so nothing is set aside for it.
    hook_port = _yaml_value(text, r"command: \[\"python\", \"-m\", \"buttress\", \"drain\", "
                                  r"\"--port\", \"(\d+)\"\]")
    assert hook_port == _yaml_value(text, r"containerPort: (\d+)")
    assert hook_port == _yaml_value(text, r"args: \[\"--port\", \"(\d+)\"")
    assert "sleep" not in re.sub(r"#.*", "", text)
    assert float(env["BUTTRESS_PRE_STOP"]) == 0
    drain_delay = float(_yaml_value(text, r"\"--drain-delay\", \"([\d.]+)\""))
    budget = ShutdownBudget.from_env(env, drain_delay=drain_delay)
    assert budget.grace_period == pytest.approx(grace)
    assert budget.drain_delay >= 5  # endpoint propagation happens during the delay now
    assert budget.margin >= 1 and budget.drain_timeout >= 10
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
