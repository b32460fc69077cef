"""A slow HTTP service that shuts down gracefully: the buttress.shutdown example.

    python examples/slow_service.py --port 8080 --work-ms 200 --server wsgi
    python examples/slow_service.py --port 8080 --work-ms 200 --server asgi --drain-delay 5
    python examples/slow_service.py --port 8080 --work-ms 200 --server gunicorn-wsgi --workers 2

GET /work answers 200 after --work-ms milliseconds; POST /echo answers its
body; GET /events is a server-sent event stream (a tick every 100 ms) that
ends itself when the drain begins: it sends ``event: bye`` and closes, so a
stream never holds the drain.  The library answers the probes: /livez,
/readyz (503 before startup completes and once draining) and /drainz (JSON:
state, in-flight count, seconds since the drain began; POST from loopback is
the preStop drain, ``python -m buttress drain --port P``).  SIGTERM or SIGINT
drains it; a second SIGINT forces an immediate exit.

``--server wsgi`` and ``asgi`` run on uvicorn in this process;
``gunicorn-wsgi`` and ``gunicorn-asgi`` replace this process with gunicorn
(``-c python:buttress.shutdown.gunicorn_conf``) and ``--workers`` workers, each
running the same lifecycle.  Under gunicorn, SIGINT is gunicorn's quick
shutdown (exit 130).

The rest of the budget comes from BUTTRESS_GRACE_PERIOD (mirror the pod's
terminationGracePeriodSeconds there) and BUTTRESS_PRE_STOP (the time the
preStop hook takes); --drain-delay and --drain-timeout override their parts.

Exit codes: 0 clean drain, 3 drain timed out (requests were cut), 4 a cleanup
hook failed, 130 forced, 2 bad arguments or port in use (1 under gunicorn,
which prints ``Error: ...``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from buttress._validate import parse_int_setting, parse_number_setting
from buttress.shutdown import (
    GracefulShutdown,
    PortInUseError,
    ShutdownBudget,
    lifespan,
    serve_asgi,
    serve_wsgi,
)

logger = logging.getLogger("slow_service")

BODY = b"done\n"
TICK = 0.1  # seconds between two server-sent events
SERVERS = ("wsgi", "asgi", "gunicorn-wsgi", "gunicorn-asgi")

_controller: GracefulShutdown | None = None


def controller() -> GracefulShutdown:
    """The controller: main()'s, or under gunicorn this worker's."""
    if _controller is not None:
        return _controller
    from buttress.shutdown.gunicorn import worker_controller

    return worker_controller()


def make_wsgi_app(work_seconds: float) -> Any:
    _log_requests()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
        logger.info("request %s %s", method, path)
        if path == "/work":
            time.sleep(work_seconds)
            start_response("200 OK", [("Content-Type", "text/plain"),
                                      ("Content-Length", str(len(BODY)))])
            return [BODY]
        if path == "/echo":
            body = environ["wsgi.input"].read()
            start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        if path == "/events":
            start_response("200 OK", [("Content-Type", "text/event-stream"),
                                      ("Cache-Control", "no-store")])
            return _events_until_drain()
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                         ("Content-Length", "10")])
        return [b"not found\n"]

    return app


def _events_until_drain() -> Iterator[bytes]:
    """Server-sent events on a worker thread: stop at the drain, say goodbye, close."""
    draining = controller().draining
    tick = 0
    while not draining.wait(TICK):  # True (stop) as soon as the drain begins
        tick += 1
        yield b"data: tick %d\n\n" % tick
    yield b"event: bye\ndata: draining\n\n"


def make_asgi_app(work_seconds: float) -> Any:
    _log_requests()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)  # nothing to open or close
            return
        path = scope["path"]
        logger.info("request %s %s", scope["method"], path)
        if path == "/events":
            await _asgi_events_until_drain(send)
            return
        if path == "/work":
            await asyncio.sleep(work_seconds)
            status, body = 200, BODY
        elif path == "/echo":
            status, body = 200, await _read_body(receive)
            if body is None:
                return  # the client left before its body was complete
        else:
            status, body = 404, b"not found\n"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


async def _read_body(receive: Any) -> bytes | None:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _asgi_events_until_drain(send: Any) -> None:
    """Server-sent events on the event loop: await the drain signal between ticks."""
    draining = controller().draining
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"),
                            (b"cache-control", b"no-store")]})
    tick = 0
    while not draining:
        try:
            await asyncio.wait_for(draining.wait_async(), TICK)
        except asyncio.TimeoutError:
            tick += 1
            await send({"type": "http.response.body", "body": b"data: tick %d\n\n" % tick,
                        "more_body": True})
    await send({"type": "http.response.body", "body": b"event: bye\ndata: draining\n\n"})


def _log_requests() -> None:
    if not logging.getLogger().handlers:  # under gunicorn nothing configured the root logger
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                            stream=sys.stderr)


def _exec_gunicorn(args: argparse.Namespace) -> None:
    """Replace this process with gunicorn serving the same application."""
    kind = args.server.split("-")[1]
    env = {**os.environ}
    if args.drain_delay is not None:
        env["BUTTRESS_DRAIN_DELAY"] = args.drain_delay
    if args.drain_timeout is not None:
        env["BUTTRESS_DRAIN_TIMEOUT"] = args.drain_timeout
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:buttress.shutdown.gunicorn_conf",
            "--bind", f"{args.host}:{args.port}", "--workers", str(args.workers),
            "--threads", str(args.threads),
            "--chdir", os.path.dirname(os.path.abspath(__file__)),
            f"slow_service:make_{kind}_app({args.work_ms / 1000!r})"]
    if kind == "asgi":
        argv[5:5] = ["-k", "buttress.shutdown.gunicorn.ASGIWorker"]
    os.execve(sys.executable, argv, env)


def main(argv: list[str] | None = None) -> int:
    global _controller
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--work-ms", required=True, help="time GET /work takes")
    parser.add_argument("--server", choices=SERVERS, required=True)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--threads", type=int, default=32,
                        help="WSGI threads (per gunicorn worker); default 32")
    parser.add_argument("--drain-delay", metavar="S",
                        help="seconds to keep serving after SIGTERM while endpoints propagate")
    parser.add_argument("--drain-timeout", metavar="S",
                        help="seconds in-flight requests get once the listener closes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        work_ms = parse_int_setting("--work-ms", args.work_ms, minimum=0)
        overrides = {
            name: parse_number_setting(flag, text, minimum=0)
            for name, flag, text in (("drain_delay", "--drain-delay", args.drain_delay),
                                     ("drain_timeout", "--drain-timeout", args.drain_timeout))
            if text is not None
        }
        budget = ShutdownBudget.from_env(**overrides)
        if args.server.startswith("gunicorn"):
            args.work_ms = work_ms
            _exec_gunicorn(args)
        _controller = GracefulShutdown(budget)
        _controller.add_cleanup(lambda: logger.info("cleanup: closing clients"), name="clients")
        if args.server == "wsgi":
            return serve_wsgi(make_wsgi_app(work_ms / 1000), host=args.host, port=args.port,
                              controller=_controller, threads=args.threads)
        return serve_asgi(make_asgi_app(work_ms / 1000), host=args.host, port=args.port,
                          controller=_controller)
    except (ValueError, PortInUseError) as exc:
        print(f"slow_service: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
