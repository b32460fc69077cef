"""Suite ``shutdown``: what in-flight tracking costs a live HTTP service.

For each flavor three servers run side by side, each in its own process: the
bare application, the same application behind the buttress middleware
(in-flight counting, probes, ``Connection: close`` while draining), and a
second bare one whose ratio to the first is the run's noise floor.  All run
on the same server code (``WSGIServer``, or uvicorn through ``ASGIServer``),
so the difference is the tracking alone.  A separate client process puts the
load on them over keep-alive connections with a minimal raw-socket HTTP client
(so the client's own cost dilutes the ratio as little as possible):

* throughput: requests spread over 8 concurrent connections (time per request
  is 1 / throughput);
* latency: one connection, one request at a time (time per request is the
  round-trip latency).

Each timed run is preceded by an untimed warm-up burst on the same server, and
the runs of the three servers are interleaved, many times over; the median
decides.

The promise: at most 5% more time per request than the bare app.  Two more
cases time the middleware alone, in process, with no sockets: its absolute
cost per request, which is what the ratios above dilute.

Also runnable directly: ``python -m buttress.bench.shutdown serve ...`` and
``... load`` are the two helper processes.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any

ORDER = 40

FLAVORS = ("wsgi", "asgi")
BUTTRESS = "buttress"
BARE = "bare app"
# A second, identical bare server: the noise floor.  Its ratio to BARE is what
# "no difference at all" measures in this run.
BARE_AGAIN = "bare app again"
NOTES = {BUTTRESS: "in-flight tracking + probes", BARE: "",
         BARE_AGAIN: "a second bare process: the noise floor"}
WARM_UP = 100  # requests per connection just before each timed run (not timed)
CONCURRENCY = 8
REQUEST = b"GET /work HTTP/1.1\r\nHost: bench\r\n\r\n"
BODY = b"done\n"


def register(session: Any) -> None:
    if session.peer("uvicorn") is None:
        flavors: tuple[str, ...] = ("wsgi",)
        session.notes.append("shutdown: uvicorn is not installed; the ASGI flavor is skipped")
    else:
        flavors = FLAVORS
    # Many short runs, interleaved: bursts of load from other processes hit all sides alike.
    throughput_n = 3000 if session.quick else 6000
    latency_n = 1500 if session.quick else 3000
    repeats = 11 if session.quick else 21
    _in_process_cost(session, flavors)
    client = LoadClient()
    session.on_close(client.close)
    for flavor in flavors:
        for requests, connections, title in (
            (throughput_n, CONCURRENCY, f"{CONCURRENCY} keep-alive connections"),
            (latency_n, 1, "1 connection, one request at a time (latency)"),
        ):
            case = session.case("shutdown", f"{flavor}: {requests:,} requests, {title}",
                                unit="request", repeats=repeats)
            for name in (BUTTRESS, BARE, BARE_AGAIN):
                side = _Side(client, flavor, tracked=name == BUTTRESS, connections=connections)
                session.on_close(side.close)
                case.add(name, _load(client, requests, connections), setup=side.prepare,
                         items=requests, note=NOTES[name])
            case.target(BUTTRESS, BARE, max_ratio=1.05)


def _in_process_cost(session: Any, flavors: tuple[str, ...]) -> None:
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
    if "asgi" not in flavors:
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

    def __init__(self, client: LoadClient, flavor: str, *, tracked: bool,
                 connections: int) -> None:
        self.client = client
        self.flavor = flavor
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
            self.server = ServerProcess(self.flavor, tracked=self.tracked)
            self.client.run(self.server.port, 1000, CONCURRENCY)  # imports, first requests
        self.client.run(self.server.port, WARM_UP * self.connections, self.connections)
        return self.server.port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


# -- the helper processes, seen from the benchmark ------------------------------------


class ServerProcess:
    """``serve`` in a child process; it stops (drains) when its stdin closes."""

    def __init__(self, flavor: str, *, tracked: bool) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "buttress.bench.shutdown", "serve", "--flavor", flavor,
             "--mode", "tracked" if tracked else "bare"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_child_env(),
        )
        self.port = int(_expect(self.process, "PORT"))

    def close(self) -> None:
        _close_process(self.process)


class LoadClient:
    """``load`` in a child process: one command in, one elapsed time out."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "buttress.bench.shutdown", "load"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_child_env(),
        )
        _expect(self.process, "READY")

    def run(self, port: int, requests: int, connections: int) -> float:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{port} {requests} {connections}\n")
        self.process.stdin.flush()
        return float(_expect(self.process, "DONE"))

    def close(self) -> None:
        _close_process(self.process)


def _child_env() -> dict[str, str]:
    """The environment, with this very buttress importable (installed or from a checkout)."""
    import buttress

    root = os.path.dirname(os.path.dirname(os.path.abspath(buttress.__file__)))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _expect(process: subprocess.Popen[str], word: str) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith(word + " ") and line.strip() != word:
        process.kill()
        raise RuntimeError(f"bench helper {process.args!r} said {line!r}, expected {word}")
    return line[len(word):].strip()


def _close_process(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


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


def serve(flavor: str, tracked: bool) -> int:
    """Serve the bench app on a free loopback port; print ``PORT n``; drain at stdin EOF."""
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
        server = WSGIServer(app, host="127.0.0.1", port=0)
    else:
        app = ASGIMiddleware(_asgi_app, controller) if tracked else _asgi_app
        server = ASGIServer(app, host="127.0.0.1", port=0, lifespan="off")

    def watch_parent() -> None:
        sys.stdin.read()  # EOF: the benchmark finished or died
        controller.begin_drain("bench finished")

    threading.Thread(target=watch_parent, daemon=True).start()
    print(f"PORT {server.port}", flush=True)
    return controller.run(server)


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
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = b""
            for _ in range(requests):
                sock.sendall(REQUEST)
                while (end := buffer.find(b"\r\n\r\n")) < 0:
                    buffer += _recv(sock)
                head, buffer = buffer[:end], buffer[end + 4:]
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"unexpected response {head[:80]!r}")
                lowered = head.lower()
                start = lowered.index(b"content-length:") + len(b"content-length:")
                stop = lowered.find(b"\r\n", start)
                length = int(head[start:stop if stop >= 0 else len(head)])
                while len(buffer) < length:
                    buffer += _recv(sock)
                buffer = buffer[length:]
    except BaseException as exc:
        errors.append(exc)


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("server closed the connection mid-benchmark")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m buttress.bench.shutdown")
    commands = parser.add_subparsers(dest="command", required=True)
    serving = commands.add_parser("serve", help="serve the bench app (bare or tracked)")
    serving.add_argument("--flavor", choices=FLAVORS, required=True)
    serving.add_argument("--mode", choices=("bare", "tracked"), required=True)
    commands.add_parser("load", help="put load on servers, driven over stdin/stdout")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.flavor, args.mode == "tracked")
    load(sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
