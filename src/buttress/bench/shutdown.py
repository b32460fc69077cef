"""Suite ``shutdown``: what in-flight tracking costs a live HTTP service, and the WSGI path.

Three server kinds, each measured as three servers side by side, each in its
own process: the bare application, the same application behind the buttress
middleware (in-flight counting, probes, ``Connection: close`` while
draining), and a second bare one whose ratio to the first is the run's noise
floor.  All run on the same server code, so the difference is the tracking
alone:

* ``uvicorn wsgi``: ``serve_wsgi``'s path (uvicorn, llhttp, a2wsgi, a pool
  of threads), tracked at the ASGI level;
* ``uvicorn asgi``: ``serve_asgi``'s path;
* ``gunicorn``: one gunicorn worker of ``buttress.shutdown.gunicorn.WSGIWorker``
  (bare: the same worker without the middleware).

A fourth case puts the new WSGI path against other WSGI servers on the same
application with 8 keep-alive connections: gunicorn's ``gthread`` worker
(one worker, 8 threads) and, when ``BUTTRESS_BENCH_OLD_SRC`` names the
``src`` directory of a checkout from before issue 12 (the standard library's
``ThreadingHTTPServer`` with a hand-written gateway), that old path.

A separate client process puts the load on them over keep-alive connections
(``buttress.bench._http``: responses parsed by httptools, a few microseconds of
client work per request, so the client's own cost dilutes the ratio as little
as possible):

* throughput: requests spread over 8 concurrent connections (time per request
  is 1 / throughput);
* latency: one connection, one request at a time (time per request is the
  round-trip latency).

Each timed run is preceded by an untimed warm-up burst on the same server, and
the runs of the servers are interleaved, many times over; the median decides.

The promises: at most 5% more time per request than the bare app of the same
kind; the new WSGI path at least as fast as gthread and the old path.  Two
more cases time the middleware alone, in process, with no sockets: its
absolute cost per request, which is what the ratios above dilute.

Also runnable directly: ``python -m buttress.bench.shutdown serve ...`` and
``... load`` are the helper processes.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, Any

from buttress.bench._child import OLD_SRC_ENV, child_env, close_child, expect

ORDER = 40

KINDS = ("wsgi", "asgi", "gunicorn")
KIND_TITLES = {"wsgi": "uvicorn wsgi", "asgi": "uvicorn asgi", "gunicorn": "gunicorn wsgi"}
BUTTRESS = "buttress"
BARE = "bare app"
# A second, identical bare server: the noise floor.  Its ratio to BARE is what
# "no difference at all" measures in this run.
BARE_AGAIN = "bare app again"
GTHREAD = "gunicorn gthread"
OLD = "stdlib gateway (before #12)"
NOTES = {BUTTRESS: "in-flight tracking + probes", BARE: "",
         BARE_AGAIN: "a second bare process: the noise floor",
         GTHREAD: "1 worker, 8 threads, bare app", OLD: "ThreadingHTTPServer, tracked"}
WARM_UP = 100  # requests per connection just before each timed run (not timed)
CONCURRENCY = 8
BODY = b"done\n"


def register(session: Any) -> None:
    kinds: list[str] = []
    if session.peer("uvicorn") is None or session.peer("a2wsgi") is None:
        session.notes.append("shutdown: uvicorn or a2wsgi is not installed; servers skipped")
    else:
        kinds = ["wsgi", "asgi"]
        if session.peer("gunicorn") is None:
            session.notes.append("shutdown: gunicorn is not installed; its cases are skipped")
        else:
            kinds.append("gunicorn")
    # Many short runs, interleaved: bursts of load from other processes hit all sides alike.
    throughput_n = 3000 if session.quick else 6000
    latency_n = 1500 if session.quick else 3000
    repeats = 11 if session.quick else 21
    _in_process_cost(session, "asgi" in kinds)
    if not kinds:
        return
    client = LoadClient()
    session.on_close(client.close)
    for kind in kinds:
        for requests, connections, title in (
            (throughput_n, CONCURRENCY, f"{CONCURRENCY} keep-alive connections"),
            (latency_n, 1, "1 connection, one request at a time (latency)"),
        ):
            case = session.case("shutdown", f"{KIND_TITLES[kind]}: {requests:,} requests, {title}",
                                unit="request", repeats=repeats)
            for name in (BUTTRESS, BARE, BARE_AGAIN):
                side = _Side(client, kind, tracked=name == BUTTRESS, connections=connections)
                session.on_close(side.close)
                case.add(name, _load(client, requests, connections), setup=side.prepare,
                         items=requests, note=NOTES[name])
            case.target(BUTTRESS, BARE, max_ratio=1.05)
    _wsgi_servers(session, client, throughput_n, repeats, "gunicorn" in kinds)


def _wsgi_servers(session: Any, client: LoadClient, requests: int, repeats: int,
                  gunicorn: bool) -> None:
    """The new WSGI path against gthread and the old standard-library path, same app."""
    case = session.case("shutdown", f"WSGI servers: {requests:,} requests, {CONCURRENCY} "
                        "keep-alive connections", unit="request", repeats=repeats)

    def add(name: str, kind: str, tracked: bool, note: str) -> None:
        side = _Side(client, kind, tracked=tracked, connections=CONCURRENCY)
        session.on_close(side.close)
        case.add(name, _load(client, requests, CONCURRENCY), setup=side.prepare,
                 items=requests, note=note)

    add(BUTTRESS, "wsgi", True, "serve_wsgi: uvicorn + a2wsgi, tracked")
    if gunicorn:
        add(GTHREAD, "gthread", False, NOTES[GTHREAD])
        case.target(BUTTRESS, GTHREAD, max_ratio=1.0)
    else:
        case.skip(GTHREAD, "gunicorn is not installed")
    if os.environ.get(OLD_SRC_ENV):
        add(OLD, "old", True, NOTES[OLD])
        case.target(BUTTRESS, OLD, max_ratio=1.0)
    else:
        case.skip(OLD, f"set {OLD_SRC_ENV} to the src/ of a checkout before issue 12")


def _in_process_cost(session: Any, with_asgi: bool) -> None:
    """The middleware's own cost per request, without sockets: the figure behind the ratios."""
    from buttress.shutdown import ASGIMiddleware, GracefulShutdown, WSGIMiddleware

    calls = 20_000 if session.quick else 100_000
    controller = GracefulShutdown()
    environ = {"PATH_INFO": "/work", "REQUEST_METHOD": "GET"}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        return None

    def wsgi_requests(app: Any) -> None:
        for _ in range(calls):
            body = app(environ, start_response)
            for _chunk in body:
                pass
            getattr(body, "close", _no_close)()

    tracked_wsgi = WSGIMiddleware(_wsgi_app, controller)
    case = session.case("shutdown", f"wsgi: middleware alone, {calls:,} calls in process",
                        unit="request")
    case.add("buttress", lambda: wsgi_requests(tracked_wsgi), items=calls)
    case.add(BARE, lambda: wsgi_requests(_wsgi_app), items=calls)
    if not with_asgi:
        return
    import asyncio

    scope = {"type": "http", "path": "/work", "method": "GET"}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    async def asgi_requests(app: Any) -> None:
        for _ in range(calls):
            await app(scope, receive, send)

    tracked_asgi = ASGIMiddleware(_asgi_app, controller)
    case = session.case("shutdown", f"asgi: middleware alone, {calls:,} calls in process",
                        unit="request")
    case.add("buttress", lambda: asyncio.run(asgi_requests(tracked_asgi)), items=calls)
    case.add(BARE, lambda: asyncio.run(asgi_requests(_asgi_app)), items=calls)


def _no_close() -> None:
    return None


def _load(client: LoadClient, requests: int, connections: int) -> Any:
    return lambda port: client.run(port, requests, connections)


class _Side:
    """One implementation's server process, made ready (untimed) before each timed run."""

    def __init__(self, client: LoadClient, kind: str, *, tracked: bool,
                 connections: int) -> None:
        self.client = client
        self.kind = kind
        self.tracked = tracked
        self.connections = connections
        self.server: ServerProcess | None = None

    def prepare(self) -> int:
        """The port to time, after a warm-up burst on it (the process starts on first use).

        The warm-up makes every side start equally warm: otherwise the server timed
        first in each round has sat idle while the others ran (cold caches, a parked
        thread, a slower CPU clock) and pays for it in its first requests.
        """
        if self.server is None:
            self.server = ServerProcess(self.kind, tracked=self.tracked)
            self.client.run(self.server.port, 1000, CONCURRENCY)  # imports, first requests
        self.client.run(self.server.port, WARM_UP * self.connections, self.connections)
        return self.server.port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


# -- the helper processes, seen from the benchmark ------------------------------------


class ServerProcess:
    """One server in a child process, listening on a loopback port; stopped by SIGTERM.

    ``wsgi``/``asgi``: ``serve`` below; ``gunicorn``: one worker of ours;
    ``gthread``: gunicorn's threaded worker; ``old``: the old commit's own
    ``serve`` (``BUTTRESS_BENCH_OLD_SRC``), which stops at stdin EOF.
    """

    def __init__(self, kind: str, *, tracked: bool) -> None:
        env = child_env()
        self.port = _free_port()
        me = "buttress.bench.shutdown"
        if kind in ("wsgi", "asgi"):
            command = [sys.executable, "-m", me, "serve", "--flavor", kind,
                       "--mode", "tracked" if tracked else "bare", "--port", str(self.port)]
        elif kind == "old":
            env["PYTHONPATH"] = os.environ[OLD_SRC_ENV]
            command = [sys.executable, "-m", me, "serve", "--flavor", "wsgi", "--mode", "tracked"]
        else:
            command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}",
                       "--workers", "1", "--log-level", "warning"]
            if kind == "gunicorn":
                worker = ("buttress.shutdown.gunicorn.WSGIWorker" if tracked
                          else f"{me}.BareWorker")
                command += ["-c", "python:buttress.shutdown.gunicorn_conf", "-k", worker]
                env.update(BUTTRESS_DRAIN_DELAY="0", BUTTRESS_DRAIN_TIMEOUT="2")
            else:
                command += ["-k", "gthread", "--threads", str(CONCURRENCY)]
            command.append(f"{me}:_wsgi_app")
        # The servers' own logs (gunicorn's drain summary, for one) would land after
        # the report; they are kept in a file and shown only if the server fails.
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, env=env)
        try:
            if kind == "old":
                self.port = int(expect(self.process, "PORT"))
            _wait_listening(self.process, self.port)
        except RuntimeError as exc:
            self.log.seek(0)
            tail = self.log.read()[-2000:]
            self.log.close()
            raise RuntimeError(f"{exc}; its stderr ends:\n{tail}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        close_child(self.process)
        self.log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(process: subprocess.Popen[str], port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bench server {process.args!r} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"bench server {process.args!r} did not listen on {port}")


class LoadClient:
    """``load`` in a child process: one command in, one elapsed time out."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "buttress.bench.shutdown", "load"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(),
        )
        expect(self.process, "READY")

    def run(self, port: int, requests: int, connections: int) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{port} {requests} {connections}\n")
        self.process.stdin.flush()
        return float(expect(self.process, "DONE"))

    def close(self) -> None:
        close_child(self.process)


# -- the helper processes themselves -------------------------------------------------


def _wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [BODY]


async def _asgi_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": BODY})


def serve(flavor: str, tracked: bool, port: int = 0) -> int:
    """Serve the bench app on a loopback port; print ``PORT n``; drain at SIGTERM."""
    from buttress.shutdown import (
        ASGIMiddleware,
        ASGIServer,
        GracefulShutdown,
        ShutdownBudget,
        WSGIMiddleware,
        WSGIServer,
    )

    controller = GracefulShutdown(ShutdownBudget(drain_delay=0, drain_timeout=2, cleanup=1,
                                                 margin=1))
    server: Any
    if flavor == "wsgi":
        app: Any = WSGIMiddleware(_wsgi_app, controller) if tracked else _wsgi_app
        server = WSGIServer(app, host="127.0.0.1", port=port)
    else:
        app = ASGIMiddleware(_asgi_app, controller) if tracked else _asgi_app
        server = ASGIServer(app, host="127.0.0.1", port=port, lifespan="off")
    def watch_parent() -> None:
        sys.stdin.read()  # EOF: the benchmark finished or died
        controller.begin_drain("bench finished")

    threading.Thread(target=watch_parent, daemon=True).start()
    print(f"PORT {server.port}", flush=True)
    return controller.run(server)


@functools.cache
def _bare_worker_class() -> type[Any]:
    from buttress.shutdown._wsgi import WSGIServer
    from buttress.shutdown.gunicorn import WSGIWorker

    class BareWorker(WSGIWorker):
        """Our gunicorn worker without the middleware: the bare server of the same kind."""

        def _server(self, controller: Any, sockets: Any, options: dict[str, Any]) -> Any:
            return WSGIServer(self.wsgi, sockets=sockets, threads=32, **options)

    return BareWorker


def __getattr__(name: str) -> Any:
    if name == "BareWorker":  # gunicorn imports it by name; built on first use
        return _bare_worker_class()
    raise AttributeError(name)


def load(commands: IO[str], replies: IO[str]) -> None:
    """Answer ``port requests connections`` lines with ``DONE seconds``."""
    print("READY", file=replies, flush=True)
    for line in commands:
        port, requests, connections = (int(word) for word in line.split())
        shares = [requests // connections + (i < requests % connections)
                  for i in range(connections)]
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_keep_alive, args=(port, share, errors))
                   for share in shares]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"load failed: {errors[0]!r}") from errors[0]
        print(f"DONE {elapsed}", file=replies, flush=True)


def _keep_alive(port: int, requests: int, errors: list[BaseException]) -> None:
    """``requests`` GETs, one after another, on one keep-alive connection."""
    from buttress.bench._http import KeepAliveConnection

    try:
        with KeepAliveConnection(port) as connection:
            for _ in range(requests):
                status, _body = connection.request("GET", "/work")
                if status != 200:
                    raise RuntimeError(f"unexpected status {status}")
    except BaseException as exc:
        errors.append(exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m buttress.bench.shutdown")
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve", help="serve the bench app (bare or tracked)")
    serving.add_argument("--flavor", choices=("wsgi", "asgi"), required=True)
    serving.add_argument("--mode", choices=("bare", "tracked"), required=True)
    serving.add_argument("--port", type=int, default=0)
    commands.add_parser("load", help="put load on servers, driven over stdin/stdout")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.flavor, args.mode == "tracked", args.port)
    load(sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
