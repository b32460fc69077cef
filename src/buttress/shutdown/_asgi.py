"""The one server path: a middleware for the controller and uvicorn, driven programmatically.

uvicorn alone closes its listener the moment it is signalled, reports no
readiness and, by default, waits forever for open connections.  Here uvicorn
runs on a background thread with its own signal handling switched off; the
controller on the main thread owns the signals and tells it when to stop
accepting, and cuts what is left at the drain deadline.  WSGI applications
take the same path through an adapter (``_wsgi``), and so do the gunicorn
workers (``gunicorn``): one server, one drain.

HTTP is parsed by llhttp (Node.js's parser, through httptools: uvicorn's
``http="httptools"``).  Measured against the attacks in
tests/test_shutdown_http.py, it refuses more than h11 does: both refuse
conflicting Content-Length, obfuscated Transfer-Encoding and ``+5``/``1_0``
lengths, but h11 accepts Content-Length together with Transfer-Encoding (and
serves the bytes after the chunked body as a second request), bare-LF line
endings and obsolete line folding, which llhttp answers 400.  Neither caps
the request head when it arrives in one read, so :class:`LimitedHttpToolsProtocol`
adds the caps (414 for a long request line, 431 for a long header block): it
counts what llhttp hands over and parses nothing itself.  uvicorn, on either
parser, never sends a header value holding CR/LF nor a body past its
Content-Length.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from buttress._validate import (
    require_bool,
    require_callable,
    require_int,
    require_number,
    require_str,
)
from buttress.shutdown._lifecycle import GracefulShutdown, listen

__all__ = ["ASGIMiddleware", "ASGIServer", "serve_asgi"]

logger = logging.getLogger("buttress.shutdown")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CLOSE = (b"connection", b"close")
_CUT_BODY = b"cut: the service is shutting down\n"
_FORBIDDEN_BODY = b"the drain endpoint answers only from inside the pod (loopback)\n"


def serve_asgi(
    app: ASGIApp,
    *,
    host: str = "0.0.0.0",
    port: int = 8000,
    controller: GracefulShutdown | None = None,
    handle_signals: bool = True,
    metrics_registry: Any = None,
    **uvicorn_options: Any,
) -> int:
    """Serve ``app`` under uvicorn until SIGTERM/SIGINT, drain it, return the exit code.

    ``sys.exit(serve_asgi(app, port=8080))`` is a complete service.  Extra
    keyword arguments go to ``uvicorn.Config``.  With a prometheus-client
    ``metrics_registry``, ``GET /metrics`` serves it.  Raises
    :class:`PortInUseError` naming the port if it is taken.
    """
    check_serve_arguments(app, host, handle_signals)
    controller = controller if controller is not None else GracefulShutdown()
    middleware = ASGIMiddleware(app, controller, metrics_registry=metrics_registry)
    server = ASGIServer(middleware, host=host, port=port, controller=controller,
                        **uvicorn_options)
    return controller.run(server, handle_signals=handle_signals)


def check_serve_arguments(app: Any, host: Any, handle_signals: Any) -> None:
    """The checks serve_asgi and serve_wsgi share, made before anything binds or serves."""
    require_callable("app", app)
    require_str("host", host)
    require_bool("handle_signals", handle_signals)


def uvicorn_defaults(controller: GracefulShutdown | None, options: dict[str, Any]) -> None:
    """The uvicorn settings every buttress server uses unless told otherwise."""
    # llhttp with caps on the request head (see the module docstring).
    options.setdefault("http", limited_httptools_protocol())
    options.setdefault("log_config", None)  # logging belongs to the application
    options.setdefault("access_log", False)
    # Outlive a load balancer's idle timeout; the drain closes idle connections itself, so
    # a long keep-alive never delays the exit.
    options.setdefault("timeout_keep_alive", 15)
    if controller is not None:
        budget = controller.budget
        # uvicorn's own deadline is only a backstop: the controller cuts at drain_timeout.
        options.setdefault("timeout_graceful_shutdown",
                           math.ceil(budget.drain_timeout + budget.cleanup) + 1)


class ControllerMiddleware:
    """What the ASGI and WSGI middlewares share: the app, its controller, the probe paths."""

    def __init__(self, app: Any, controller: GracefulShutdown, *,
                 metrics_registry: Any = None) -> None:
        if not isinstance(controller, GracefulShutdown):
            raise TypeError(f"controller must be a GracefulShutdown, got "
                            f"{type(controller).__name__}: {controller!r}")
        self.app = app
        self.controller = controller
        self.metrics_registry = metrics_registry
        self._probe_paths = _probe_paths(controller, metrics_registry)


class ASGIMiddleware(ControllerMiddleware):
    """Counts in-flight HTTP requests for the controller and answers its probes.

    While the service drains, responses get ``Connection: close``.  A request
    cut at the drain deadline (its task cancelled) is answered 503 with
    ``Connection: close`` if its response had not started, and counted as
    aborted; one cut mid-response can only have its connection closed.
    Lifespan and websocket scopes pass straight through.

    Probes are answered on the event loop, never queued behind the
    application.  ``POST`` to the drain path (``/drainz``) from loopback is the
    preStop drain (``python -m buttress drain``): it starts the drain and
    answers once the in-flight requests are done or cut; from anywhere else it
    is refused with 403.  With a prometheus-client ``metrics_registry``,
    ``GET /metrics`` serves it (not counted as in flight).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        controller = self.controller
        if scope["path"] in self._probe_paths:
            if scope["method"] == "POST" and scope["path"] == controller.probe_paths.drain:
                await self._drain_request(scope, send)
            else:
                await self._probe(scope["path"], send)
            return
        response_started = False

        async def tracked_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                if controller._draining:
                    message = {**message, "headers": [*message.get("headers", ()), _CLOSE]}
            await send(message)

        controller.request_started()
        aborted = False
        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            # Only the server cancels a request task, and only at the drain deadline; this
            # is the top of the task, so answering here (not re-raising) ends it cleanly.
            aborted = True
            logger.warning("request %s %s cut at the drain deadline",
                           scope.get("method"), scope.get("path"))
            if not response_started:
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", b"%d" % len(_CUT_BODY)),
                                        _CLOSE]})
                await send({"type": "http.response.body", "body": _CUT_BODY})
        finally:
            controller.request_finished(aborted=aborted)

    async def _probe(self, path: str, send: Send) -> None:
        answer = self.controller.probe(path, self.metrics_registry)
        assert answer is not None
        await self._answer(send, *answer)

    async def _answer(self, send: Send, status: int, content_type: str, body: bytes) -> None:
        headers = [(b"content-type", content_type.encode()),
                   (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store")]
        if self.controller._draining:
            headers.append(_CLOSE)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _drain_request(self, scope: Scope, send: Send) -> None:
        """The preStop drain: begin the drain, answer when in-flight work is done or cut."""
        controller = self.controller
        if not _from_inside_the_pod(scope.get("client")):
            logger.warning("drain request from %s refused: loopback only", scope.get("client"))
            await self._answer(send, 403, "text/plain; charset=utf-8", _FORBIDDEN_BODY)
            return
        controller._drain_waiters.append(None)  # the drain does not wait for this connection
        try:
            controller.drain_requester()
            try:
                await controller.drained
            except asyncio.CancelledError:
                # Cut at the deadline along with the requests: wait (briefly) for the drain
                # to finish counting them, then answer.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(controller.drained.wait_async(), 5)
        finally:
            controller._drain_waiters.pop()
        report = {**controller.drain_status(), "drained": controller.stats()["drained"]}
        await self._answer(send, 200, "application/json", json.dumps(report).encode())


def _probe_paths(controller: GracefulShutdown, metrics_registry: Any) -> frozenset[str]:
    from buttress.shutdown._lifecycle import METRICS_PATH

    paths = controller.probe_paths
    extra = (METRICS_PATH,) if metrics_registry is not None else ()
    return frozenset((paths.live, paths.ready, paths.drain, *extra))


def _from_inside_the_pod(client: Any) -> bool:
    """True for a loopback peer (or a Unix socket, which has no address)."""
    if not client:
        return True
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


class ASGIServer:
    """uvicorn on a background thread, stopped step by step by the controller.

    The listening socket is bound here, in the constructor, so a taken port
    fails early with :class:`PortInUseError`; or ``sockets`` are listening
    sockets bound elsewhere (a gunicorn worker's).  Keyword arguments go to
    ``uvicorn.Config`` (``timeout_keep_alive``, ``lifespan`` ...); ``http``
    defaults to ``"h11"``.  Given the ``controller``, the drain leaves the
    connections waiting on a preStop drain request out of its wait.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "0.0.0.0",
        port: int = 8000,
        backlog: int = 2048,
        startup_timeout: float = 60.0,
        sockets: list[socket.socket] | None = None,
        controller: GracefulShutdown | None = None,
        **uvicorn_options: Any,
    ) -> None:
        import uvicorn

        require_int("backlog", backlog, minimum=1)
        self.host = host
        self.startup_timeout = require_number("startup_timeout", startup_timeout, above=0)
        self._controller = controller
        if sockets:
            self._sockets = list(sockets)
        else:
            self._sockets = [listen(host, port, backlog)]
        self._sock = self._sockets[0]
        self.port: int = self._sock.getsockname()[1]
        uvicorn_defaults(controller, uvicorn_options)
        config = uvicorn.Config(app, host=host, port=self.port, backlog=backlog, **uvicorn_options)
        self._server = _uvicorn_server_class()(config)
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # -- driven by the controller -----------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="buttress-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.ready.wait(0.05):
            if not self._thread.is_alive():
                raise RuntimeError(f"uvicorn failed to start on port {self.port}: "
                                   f"{self._failure!r}") from self._failure
            if time.monotonic() >= deadline:
                raise TimeoutError(f"uvicorn did not start within {self.startup_timeout}s")
        logger.info("ASGI server (uvicorn) listening on http://%s:%d", self.host, self.port)

    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop_accepting(self) -> None:
        if self.serving():
            self._call_in_loop(self._stop_accepting)

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        state = self._server.server_state
        controller = self._controller
        while self.serving() and len(state.connections) > (
                controller.drain_waiters() if controller is not None else 0):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def abort(self) -> int:
        if not self.serving():
            return 0
        cut: int | None = self._call_in_loop(self._cancel_requests)
        if cut is None:
            self._server.force_exit = True
            return len(self._server.server_state.tasks)
        return cut

    def close(self, timeout: float) -> None:
        """Let uvicorn finish (lifespan shutdown) within ``timeout``, then force it."""
        self._server.should_exit = True
        if self._thread is None:
            for sock in self._sockets:
                sock.close()
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("uvicorn did not finish within %.3gs; forcing it", timeout)
            self._server.force_exit = True
            self._thread.join(1.0)

    def stats(self) -> dict[str, Any]:
        state = self._server.server_state
        return {"open": len(state.connections), "tasks": len(state.tasks),
                "requests_total": state.total_requests, "serving": self.serving()}

    # -- on the event loop ----------------------------------------------------------

    def _run(self) -> None:
        try:
            self._server.run(sockets=self._sockets)
        except BaseException as exc:  # SystemExit from a failed lifespan startup included
            self._failure = exc
            logger.error("uvicorn stopped: %r", exc)

    def _call_in_loop(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on uvicorn's event loop; None if the loop does not answer."""

        async def call() -> Any:
            return function()

        future = asyncio.run_coroutine_threadsafe(call(), self._server.loop)
        try:
            return future.result(timeout=10)
        except concurrent.futures.TimeoutError:
            # The loop is blocked (a handler doing blocking work?): let uvicorn's own
            # shutdown path act whenever it runs again.
            future.cancel()
            logger.error("uvicorn's event loop did not answer within 10s; leaving %s to it",
                         getattr(function, "__name__", function))
            self._server.should_exit = True
            return None

    def _stop_accepting(self) -> None:
        server = self._server
        for listener in server.servers:
            listener.close()  # new connections are refused from here on
        # uvicorn's per-connection shutdown: idle ones close now, busy ones after their reply.
        # The loop is single-threaded, so a request whose bytes were already read is busy.
        connections = list(server.server_state.connections)
        for connection in connections:
            connection.shutdown()
        server.should_exit = True  # uvicorn's own shutdown path follows, waiting on us
        logger.info("stopped accepting; asked %d connection(s) to close", len(connections))

    def _cancel_requests(self) -> int:
        tasks = [task for task in self._server.server_state.tasks if not task.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)


MAX_REQUEST_LINE = 8190  # bytes of request target; longer -> 414 (gunicorn's limit is 4094)
MAX_HEAD = 64 * 1024  # bytes of header block; larger -> 431
MAX_HEADERS = 100  # header fields; more -> 431 (gunicorn's limit_request_fields)
# Seconds a request head may take to arrive whole (Apache's RequestReadTimeout default:
# a head comes in one or two packets; a client slower than this is holding the line).
HEAD_TIMEOUT = 20.0


@functools.cache
def limited_httptools_protocol() -> type[Any]:
    """uvicorn's httptools protocol with caps on the request head (414 and 431) and a
    deadline for it.

    llhttp buffers a request line or header block of any length; these caps
    only count the bytes and fields llhttp hands to uvicorn (and, while a head
    is incomplete, the bytes received), so a slow or endless head cannot grow
    without bound.  Parsing stays llhttp's.

    A head must also arrive whole within ``HEAD_TIMEOUT`` seconds, counted
    from the connection's start or from the first byte of a later request;
    otherwise the connection is closed.  uvicorn times only the idle gap after
    a response, and the first byte of a head stops that clock: a client that
    connects and sends nothing, or a few bytes of a head and then nothing, held
    its connection (and a file descriptor) for ever.
    """
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class TooLarge(httptools.HttpParserError):
        pass

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        max_request_line = MAX_REQUEST_LINE
        max_head = MAX_HEAD
        max_headers = MAX_HEADERS

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = False
            self._head_bytes = 0
            self._refusal: tuple[int, bytes] | None = None
            self._head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._start_head_clock()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_clock()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._head_bytes = 0
            self._start_head_clock()  # kept running if the connection's own is still on

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            if len(self.url) > self.max_request_line:
                self._refuse(414, b"URI Too Long")

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            self._head_bytes += len(name) + len(value) + 4
            if self._head_bytes > self.max_head or len(self.headers) > self.max_headers:
                self._refuse(431, b"Request Header Fields Too Large")

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._stop_head_clock()
            super().on_headers_complete()

        def _start_head_clock(self) -> None:
            if self._head_deadline is None:
                self._head_deadline = self.loop.call_later(HEAD_TIMEOUT, self._head_timed_out)

        def _stop_head_clock(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_timed_out(self) -> None:
            self._head_deadline = None
            if self.cycle is not None and not self.cycle.response_complete:
                # A pipelined head behind a response still being written: its clock
                # starts again rather than cutting that response.
                self._start_head_clock()
            elif not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and self._refusal is None:  # every byte so far was head
                self._head_bytes += len(data)
                if self._head_bytes > self.max_head + self.max_request_line:
                    self._refusal = (431, b"Request Header Fields Too Large")
                    self.send_400_response("")

        def _refuse(self, status: int, reason: bytes) -> None:
            self._refusal = (status, reason)
            raise TooLarge(reason.decode())

        def send_400_response(self, msg: str) -> None:
            if self._refusal is None:
                super().send_400_response(msg)
                return
            status, reason = self._refusal
            body = reason + b"\n"
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (status, reason, len(body), body))
            self.transport.close()

    return LimitedHttpToolsProtocol


@functools.cache
def _uvicorn_server_class() -> type[Any]:
    """uvicorn.Server without its signal handling, announcing when it is up."""
    import uvicorn

    class Server(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.ready = threading.Event()
            self.loop: asyncio.AbstractEventLoop | None = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the controller owns the signals, on the main thread

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)
            if self.started:
                self.ready.set()

    return Server
