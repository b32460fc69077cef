"""The WSGI flavor: the application runs on uvicorn through a WSGI-to-ASGI adapter.

``serve_wsgi`` and :class:`WSGIServer` run a WSGI application on the same
uvicorn server path as the ASGI flavor (``_asgi``), through a2wsgi, a
maintained WSGI-to-ASGI adapter, on a bounded pool of daemon threads.  HTTP is
parsed and written by h11; buttress adds only what the adapter leaves to the
server and the lifecycle needs:

* header names holding ``_`` are dropped before the adapter builds the
  environ (``X_Forwarded_For`` would otherwise merge into
  ``HTTP_X_FORWARDED_FOR``: a spoofed header), as gunicorn does;
* a request body of up to ``max_buffered_body`` bytes is received whole
  before the application is called, so a request cut short by its client
  never reaches the application;
* the pool's threads are daemons: a request cut at the drain deadline cannot
  hold up the exit.

:class:`WSGIMiddleware` is the tracking middleware at the WSGI level, for
other WSGI servers; under ``serve_wsgi`` the ASGI middleware tracks requests
(so cut requests are counted and answered 503, as for ASGI).
"""

from __future__ import annotations

import concurrent.futures
import http
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from buttress._validate import require_int
from buttress.shutdown._asgi import (
    ASGIMiddleware,
    ASGIServer,
    Message,
    Receive,
    Scope,
    Send,
    _probe_paths,
)
from buttress.shutdown._lifecycle import GracefulShutdown

__all__ = ["WSGIGateway", "WSGIMiddleware", "WSGIServer", "serve_wsgi"]

logger = logging.getLogger("buttress.shutdown")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

DEFAULT_THREADS = 32  # the bounded pool: requests beyond it wait for a thread (in flight)
MAX_BUFFERED_BODY = 1024 * 1024  # larger request bodies stream to the application


def serve_wsgi(
    app: WSGIApp,
    *,
    host: str = "0.0.0.0",
    port: int = 8000,
    controller: GracefulShutdown | None = None,
    handle_signals: bool = True,
    threads: int = DEFAULT_THREADS,
    metrics_registry: Any = None,
    **uvicorn_options: Any,
) -> int:
    """Serve ``app`` until SIGTERM/SIGINT, drain it gracefully, return the exit code.

    ``sys.exit(serve_wsgi(app, port=8080))`` is a complete service: uvicorn
    (h11) with the application on ``threads`` worker threads.  Extra keyword
    arguments go to ``uvicorn.Config``.  With a prometheus-client
    ``metrics_registry``, ``GET /metrics`` serves it.  Raises
    :class:`PortInUseError` naming the port if it is taken.
    """
    controller = controller if controller is not None else GracefulShutdown()
    server = WSGIServer(WSGIMiddleware(app, controller, metrics_registry=metrics_registry),
                        host=host, port=port, threads=threads, **uvicorn_options)
    return controller.run(server, handle_signals=handle_signals)


class WSGIServer(ASGIServer):
    """A WSGI application on uvicorn (:class:`ASGIServer`) through :class:`WSGIGateway`.

    Given a :class:`WSGIMiddleware`, its controller tracks the requests at the
    ASGI level (the middleware's own WSGI-level tracking is not used twice).
    Keyword arguments are :class:`ASGIServer`'s and ``uvicorn.Config``'s.
    """

    def __init__(self, app: WSGIApp, *, threads: int = DEFAULT_THREADS,
                 max_buffered_body: int = MAX_BUFFERED_BODY, **options: Any) -> None:
        controller = options.pop("controller", None)
        registry = None
        if isinstance(app, WSGIMiddleware):
            controller, registry, app = app.controller, app.metrics_registry, app.app
        self.gateway = WSGIGateway(app, threads=threads, max_buffered_body=max_buffered_body)
        asgi: Any = self.gateway
        if controller is not None:
            asgi = ASGIMiddleware(self.gateway, controller, metrics_registry=registry)
        options.setdefault("lifespan", "off")  # a WSGI application has no lifespan
        super().__init__(asgi, controller=controller, **options)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "threads": self.gateway.pool.stats()}


class WSGIGateway:
    """A WSGI application as an ASGI application: a2wsgi plus the three guards above."""

    def __init__(self, app: WSGIApp, *, threads: int = DEFAULT_THREADS,
                 max_buffered_body: int = MAX_BUFFERED_BODY) -> None:
        from a2wsgi import WSGIMiddleware as Adapter

        self.threads = require_int("threads", threads, minimum=1)
        self.max_buffered_body = require_int("max_buffered_body", max_buffered_body, minimum=0)
        self.pool = DaemonThreadPool(self.threads)
        adapter = Adapter(app, workers=1)  # type: ignore[arg-type]
        adapter.executor.shutdown(wait=False)  # never started a thread; ours replaces it
        adapter.executor = self.pool  # type: ignore[assignment]
        self._adapter = adapter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._adapter(scope, receive, send)  # type: ignore[arg-type]
            return
        headers = scope["headers"]
        for name, _ in headers:
            if b"_" in name:
                scope = {**scope, "headers": [(n, v) for n, v in headers if b"_" not in n]}
                break
        # Receive the body before the application is called: one that never arrives whole
        # (the client gave up) ends here.  A GET's only message is already there.
        buffered: deque[Message] = deque()
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                logger.info("request %s %s dropped: the client left before its body was "
                            "complete", scope.get("method"), scope.get("path"))
                return
            buffered.append(message)
            size += len(message.get("body", b""))
            if not message.get("more_body", False) or size > self.max_buffered_body:
                break

        async def replay() -> Message:
            return buffered.popleft() if buffered else await receive()

        await self._adapter(scope, replay, send)  # type: ignore[arg-type]


class DaemonThreadPool(concurrent.futures.Executor):
    """At most ``threads`` daemon threads, started as needed.

    ``concurrent.futures.ThreadPoolExecutor`` joins its threads at interpreter
    exit, so one request cut at the drain deadline (a thread cannot be
    cancelled) would hold the process past its grace period.  Daemon threads
    do not.
    """

    def __init__(self, threads: int) -> None:
        self._max = require_int("threads", threads, minimum=1)
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._busy = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._work.put((future, fn, args, kwargs))
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if len(self._threads) < self._max:
                    thread = threading.Thread(target=self._run, daemon=True,
                                              name=f"buttress-wsgi-{len(self._threads)}")
                    self._threads.append(thread)
                    thread.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for _ in self._threads:
            self._work.put(None)

    def stats(self) -> dict[str, int]:
        return {"threads": len(self._threads), "max": self._max, "busy": self._busy}

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                self._busy += 1
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to whoever awaits the future
                    future.set_exception(exc)
                finally:
                    self._busy -= 1
                    del future, fn, args, kwargs
            self._idle.release()


class WSGIMiddleware:
    """Counts in-flight requests for the controller and answers its probes (any WSGI server).

    While the service drains, every response gets ``Connection: close`` so
    keep-alive clients reconnect (to another replica) for their next request.
    A request is in flight while the application works on it: until it returns
    a list (the whole response), or until the server closes a streamed body.
    (The drain itself waits for connections, so a response still being written
    is never cut short by this count reaching zero.)
    """

    def __init__(self, app: WSGIApp, controller: GracefulShutdown, *,
                 metrics_registry: Any = None) -> None:
        if not isinstance(controller, GracefulShutdown):
            raise TypeError(f"controller must be a GracefulShutdown, got "
                            f"{type(controller).__name__}: {controller!r}")
        self.app = app
        self.controller = controller
        self.metrics_registry = metrics_registry
        self._probe_paths = _probe_paths(controller, metrics_registry)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        controller = self.controller
        if environ.get("PATH_INFO") in self._probe_paths:
            return self._probe(environ["PATH_INFO"], start_response)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if controller._draining:
                headers = [*headers, ("Connection", "close")]
            return start_response(status, headers, exc_info)

        controller.request_started()
        try:
            body = self.app(environ, start)
        except BaseException:
            controller.request_finished()
            raise
        if type(body) is list or type(body) is tuple:  # no close(): the response is ready
            controller.request_finished()
            return body
        return _TrackedIterable(body, controller)

    def _probe(self, path: str, start_response: Callable[..., Any]) -> list[bytes]:
        answer = self.controller.probe(path, self.metrics_registry)
        assert answer is not None
        status, content_type, body = answer
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   ("Cache-Control", "no-store")]
        if self.controller._draining:
            headers.append(("Connection", "close"))
        start_response(f"{status} {http.HTTPStatus(status).phrase}", headers)
        return [body]


class _TrackedIterable:
    """A streamed body: iterated as is; ``close()`` (the server calls it) ends the request."""

    __slots__ = ("_controller", "_inner")

    def __init__(self, body: Iterable[bytes], controller: GracefulShutdown) -> None:
        self._inner = body
        self._controller: GracefulShutdown | None = controller

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._inner)

    def close(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:  # once, however often the server calls it
            try:
                _close(self._inner)
            finally:
                controller.request_finished()


def _close(body: object) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        close()
