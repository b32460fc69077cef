"""A target for the hostile-HTTP tests: every request the application sees is logged.

    python tests/shutdown_apps.py --server wsgi|asgi|gunicorn-wsgi|gunicorn-asgi --port P

Each request that reaches the application writes ``seen METHOD PATH BODYLEN``
to stderr, so a test can tell a refused request (never seen) from one passed
on.  ``/crlf`` answers with a header value holding CR/LF; ``/long`` declares
``Content-Length: 2`` and yields more; ``/slow`` takes a second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any

logger = logging.getLogger("shutdown_apps")
SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"


def _setup() -> None:
    # A test may shorten the request-head deadline (also in gunicorn's workers, which
    # build the app after the fork).
    if "SHUTDOWN_APPS_HEAD_TIMEOUT" in os.environ:
        from buttress.shutdown import _asgi

        _asgi.HEAD_TIMEOUT = float(os.environ["SHUTDOWN_APPS_HEAD_TIMEOUT"])
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s",
                            stream=sys.stderr)


def make_wsgi_app() -> Any:
    _setup()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        body = environ["wsgi.input"].read()
        path = environ["PATH_INFO"]
        spoofed = environ.get("HTTP_X_FORWARDED_FOR", "")
        logger.info("seen %s %s %d xff=%s", environ["REQUEST_METHOD"], path, len(body), spoofed)
        if path == "/slow":
            time.sleep(1.0)
        if path == "/crlf":
            start_response("200 OK", [("Content-Length", "2"),
                                      ("X-Bad", "a\r\nSet-Cookie: injected=1")])
            return [b"ok"]
        start_response("200 OK", [("Content-Length", "2")])
        if path == "/long":
            return [b"ok", SMUGGLED]
        return [b"ok"]

    return app


def make_asgi_app() -> Any:
    _setup()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                logger.info("disconnected %s %s", scope["method"], scope["path"])
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        logger.info("seen %s %s %d", scope["method"], path, len(body))
        if path == "/slow":
            await asyncio.sleep(1.0)
        headers = [(b"content-length", b"2")]
        if path == "/crlf":
            headers.append((b"x-bad", b"a\r\nSet-Cookie: injected=1"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if path == "/long":
            await send({"type": "http.response.body", "body": b"ok", "more_body": True})
            await send({"type": "http.response.body", "body": SMUGGLED})
            return
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def main(argv: list[str]) -> int:
    server, port = argv[argv.index("--server") + 1], int(argv[argv.index("--port") + 1])
    if server.startswith("gunicorn"):
        kind = server.split("-")[1]
        args = [sys.executable, "-m", "gunicorn", "-c", "python:buttress.shutdown.gunicorn_conf",
                "--bind", f"127.0.0.1:{port}", "--workers", "2",
                "--chdir", os.path.dirname(os.path.abspath(__file__))]
        if kind == "asgi":
            args += ["-k", "buttress.shutdown.gunicorn.ASGIWorker"]
        os.execv(sys.executable, [*args, f"shutdown_apps:make_{kind}_app()"])
    from buttress.shutdown import GracefulShutdown, ShutdownBudget, serve_asgi, serve_wsgi

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    controller = GracefulShutdown(ShutdownBudget.from_env())
    if server == "wsgi":
        return serve_wsgi(make_wsgi_app(), host="127.0.0.1", port=port, controller=controller)
    return serve_asgi(make_asgi_app(), host="127.0.0.1", port=port, controller=controller)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
