"""A slow HTTP service that shuts down gracefully: the buttress.shutdown example.

    python examples/slow_service.py --port 8080 --work-ms 200 --server wsgi
    python examples/slow_service.py --port 8080 --work-ms 200 --server asgi --drain-delay 5

GET /work answers 200 after --work-ms milliseconds.  The library answers the
probes: /livez, /readyz (503 before startup completes and once draining) and
/drainz (JSON: state, in-flight count, seconds since the drain began).
SIGTERM or SIGINT drains it; a second SIGINT forces an immediate exit.

The rest of the budget comes from BUTTRESS_GRACE_PERIOD (mirror the pod's
terminationGracePeriodSeconds there) and BUTTRESS_PRE_STOP (the preStop sleep);
--drain-delay and --drain-timeout override their parts.

Exit codes: 0 clean drain, 3 drain timed out (requests were cut), 4 a cleanup
hook failed, 130 forced by a second SIGINT, 2 bad arguments or port in use.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from typing import Any

from buttress.shutdown import (
    GracefulShutdown,
    PortInUseError,
    ShutdownBudget,
    serve_asgi,
    serve_wsgi,
)

logger = logging.getLogger("slow_service")

BODY = b"done\n"


def make_wsgi_app(work_seconds: float) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] != "/work":
            start_response("404 Not Found", [("Content-Type", "text/plain"),
                                             ("Content-Length", "10")])
            return [b"not found\n"]
        time.sleep(work_seconds)
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("Content-Length", str(len(BODY)))])
        return [BODY]

    return app


def make_asgi_app(work_seconds: float) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] != "/work":
            status, body = 404, b"not found\n"
        else:
            await asyncio.sleep(work_seconds)
            status, body = 200, BODY
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--work-ms", type=int, required=True, help="time GET /work takes")
    parser.add_argument("--server", choices=("wsgi", "asgi"), required=True)
    parser.add_argument("--drain-delay", metavar="S",
                        help="seconds to keep serving after SIGTERM while endpoints propagate")
    parser.add_argument("--drain-timeout", metavar="S",
                        help="seconds in-flight requests get once the listener closes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        if args.work_ms < 0:
            raise ValueError(f"--work-ms must be >= 0, got {args.work_ms}")
        budget = ShutdownBudget.from_env(drain_delay=args.drain_delay,
                                         drain_timeout=args.drain_timeout)
        controller = GracefulShutdown(budget)
        controller.add_cleanup(lambda: logger.info("cleanup: closing clients"), name="clients")
        serve = serve_wsgi if args.server == "wsgi" else serve_asgi
        make_app = make_wsgi_app if args.server == "wsgi" else make_asgi_app
        return serve(make_app(args.work_ms / 1000), port=args.port,  # type: ignore[operator]
                     controller=controller)
    except (ValueError, PortInUseError) as exc:
        print(f"slow_service: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
