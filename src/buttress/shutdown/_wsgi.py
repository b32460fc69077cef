"""The WSGI flavor: the application runs on uvicorn through a WSGI-to-ASGI adapter.

``serve_wsgi`` and :class:`WSGIServer` run a WSGI application on the same
uvicorn server path as the ASGI flavor (``_asgi``), through a2wsgi, a
maintained WSGI-to-ASGI adapter, on a bounded pool of daemon threads.  HTTP is
parsed by llhttp (httptools) with the ASGI flavor's caps and deadline on the
request head; buttress adds only what the adapter leaves to the server and
the lifecycle needs:

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

import asyncio
import concurrent.futures
import contextlib
import http
import io
import logging
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from buttress._validate import require_int, require_number
from buttress.shutdown._asgi import (
    ASGIMiddleware,
    ASGIServer,
    ControllerMiddleware,
    Message,
    Receive,
    Scope,
    Send,
    check_serve_arguments,
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
    (httptools) with the application on ``threads`` worker threads.  Extra keyword
    arguments go to ``uvicorn.Config``.  With a prometheus-client
    ``metrics_registry``, ``GET /metrics`` serves it.  Raises
    :class:`PortInUseError` naming the port if it is taken.
    """
    check_serve_arguments(app, host, handle_signals)
    controller = controller if controller is not None else GracefulShutdown()
    server = WSGIServer(WSGIMiddleware(app, controller, metrics_registry=metrics_registry),
                        host=host, port=port, threads=threads, **uvicorn_options)
    return controller.run(server, handle_signals=handle_signals)


class WSGIServer(ASGIServer):
    """A WSGI application on uvicorn (:class:`ASGIServer`) through :class:`WSGIGateway`.

    Given a :class:`WSGIMiddleware`, its controller tracks the requests at the
    ASGI level (the middleware's own WSGI-level tracking is not used twice).
    Keyword arguments are :class:`ASGIServer`'s and ``uvicorn.Config``'s;
    ``idle_timeout`` (the keep-alive timeout) is kept from the server this
    replaced.
    """

    def __init__(self, app: WSGIApp, *, threads: int = DEFAULT_THREADS,
                 max_buffered_body: int = MAX_BUFFERED_BODY, idle_timeout: float | None = None,
                 **options: Any) -> None:
        if idle_timeout is not None:  # the old server's name for the keep-alive timeout
            options.setdefault("timeout_keep_alive", require_number("idle_timeout", idle_timeout,
                                                                    above=0))
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

    def close(self, timeout: float) -> None:
        """Stop uvicorn, then let the pool's threads end (each after its current request)."""
        try:
            super().close(timeout)
        finally:
            self.gateway.pool.shutdown(wait=False)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "threads": self.gateway.pool.stats()}


class WSGIGateway:
    """A WSGI application as an ASGI application: a2wsgi's environ, one thread hop a request.

    a2wsgi's own responder crosses between the event loop and the worker
    thread three or four times per request (start, each body chunk, the end,
    each read of the body), which measured 3-4 times slower than gunicorn's
    gthread worker here.  This gateway builds the environ with a2wsgi's
    ``build_environ`` (and hands websockets and lifespan to a2wsgi), but with
    the request body already received it runs the application in one hop: a
    list body comes back whole and is sent from the loop (with a
    Content-Length when the application gave none); only a streamed body (a
    generator, ``write()``) sends its chunks from the thread as they come.
    Request bodies over ``max_buffered_body`` stream through a2wsgi.
    """

    def __init__(self, app: WSGIApp, *, threads: int = DEFAULT_THREADS,
                 max_buffered_body: int = MAX_BUFFERED_BODY) -> None:
        from a2wsgi import WSGIMiddleware as Adapter
        from a2wsgi.wsgi import build_environ

        self.app = app
        self.threads = require_int("threads", threads, minimum=1)
        self.max_buffered_body = require_int("max_buffered_body", max_buffered_body, minimum=0)
        self.pool = DaemonThreadPool(self.threads)
        adapter = Adapter(app, workers=1)  # type: ignore[arg-type]
        adapter.executor.shutdown(wait=False)  # never started a thread; ours replaces it
        adapter.executor = self.pool  # type: ignore[assignment]
        self._adapter = adapter
        self._build_environ = build_environ

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._adapter(scope, receive, send)  # type: ignore[arg-type]
            return
        headers = scope["headers"]
        has_body = False
        for name, _ in headers:
            if b"_" in name:
                scope = {**scope, "headers": [(n, v) for n, v in headers if b"_" not in n]}
            elif name == b"content-length" or name == b"transfer-encoding":
                has_body = True
        # Receive the body before the application is called: one that never arrives whole
        # (the client gave up) ends here.  A request without one has nothing to wait for.
        buffered: deque[Message] = deque()
        size = 0
        while has_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                logger.info("request %s %s dropped: the client left before its body was "
                            "complete", scope.get("method"), scope.get("path"))
                return
            buffered.append(message)
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
            if size > self.max_buffered_body:  # too big to hold: stream it through a2wsgi

                async def replay() -> Message:
                    return buffered.popleft() if buffered else await receive()

                await self._adapter(scope, replay, send)  # type: ignore[arg-type]
                return
        body = b"".join(message.get("body", b"") for message in buffered)
        environ = self._build_environ(scope, None)  # type: ignore[arg-type]
        environ["wsgi.input"] = io.BytesIO(body)
        environ["wsgi.errors"] = sys.stderr
        loop = asyncio.get_running_loop()
        response = _Response(loop, send)
        await self.pool.run_in_loop(loop, response.run, self.app, environ)
        if response.whole is not None:  # the common case: sent from here, no more hops
            await send(response.start_message(len(response.whole)))
            await send({"type": "http.response.body", "body": response.whole})


class _Response:
    """One WSGI response, produced on a worker thread."""

    __slots__ = ("_exc_info", "_headers", "_loop", "_send", "_started", "_status", "whole")

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Send) -> None:
        self._loop = loop
        self._send = send
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._started = False  # the start message went out (streaming only)
        self.whole: bytes | None = None  # the complete body, when the app returned a list

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None and self._started:
            raise exc_info[1].with_traceback(exc_info[2])
        self._status = int(status[:3])
        self._headers = [(name.encode("latin-1").lower(), value.encode("latin-1"))
                         for name, value in headers]
        return self._write

    def start_message(self, length: int | None) -> Message:
        headers = self._headers
        if length is not None and not any(name == b"content-length" for name, _ in headers):
            headers = [*headers, (b"content-length", b"%d" % length)]
        return {"type": "http.response.start", "status": self._status, "headers": headers}

    def run(self, app: WSGIApp, environ: dict[str, Any]) -> None:
        iterable = app(environ, self.start_response)
        try:
            if (type(iterable) is list or type(iterable) is tuple) and not self._started:
                self.whole = b"".join(iterable)
                return
            for chunk in iterable:
                self._write(chunk)
            if not self._started:
                self._from_thread(self.start_message(0))
                self._started = True
            self._from_thread({"type": "http.response.body", "body": b""})
        finally:
            _close(iterable)

    def _write(self, chunk: bytes) -> None:
        if not self._started:
            if not self._status:
                raise RuntimeError("the WSGI application wrote before calling start_response")
            self._from_thread(self.start_message(None))
            self._started = True
        if chunk:
            self._from_thread({"type": "http.response.body", "body": chunk, "more_body": True})

    def _from_thread(self, message: Message) -> None:
        asyncio.run_coroutine_threadsafe(_sending(self._send, message), self._loop).result()


async def _sending(send: Send, message: Message) -> None:
    await send(message)


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
        self._grow()
        return future

    def run_in_loop(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], /,
                    *args: Any) -> asyncio.Future[Any]:
        """``fn(*args)`` on a pool thread, as an asyncio future of ``loop``.

        What ``loop.run_in_executor`` does, without the concurrent.futures.Future
        in between: the request path's one thread hop, made as cheap as it gets.
        """
        future: asyncio.Future[Any] = loop.create_future()
        self._work.put((future, fn, args, loop))
        self._grow()
        return future

    def _grow(self) -> None:
        if not self._idle.acquire(blocking=False):
            with self._lock:
                if len(self._threads) < self._max:
                    thread = threading.Thread(target=self._run, daemon=True,
                                              name=f"buttress-wsgi-{len(self._threads)}")
                    self._threads.append(thread)
                    thread.start()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        for _ in self._threads:
            self._work.put(None)

    def stats(self) -> dict[str, int]:
        return {"threads": len(self._threads), "max": self._max, "busy": self._busy}

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args, extra = item
            self._busy += 1
            if isinstance(future, asyncio.Future):
                loop = extra
                try:
                    result = fn(*args)
                except BaseException as exc:  # handed to whoever awaits the future
                    _deliver(loop, _fail, future, exc)
                else:
                    _deliver(loop, _succeed, future, result)
            elif future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **extra))
                except BaseException as exc:  # handed to whoever awaits the future
                    future.set_exception(exc)
            self._busy -= 1
            del item, future, fn, args, extra
            self._idle.release()


def _deliver(loop: asyncio.AbstractEventLoop, callback: Callable[..., None],
             future: asyncio.Future[Any], value: Any) -> None:
    # A closed loop: the request was cut at the drain deadline and nobody is waiting.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, future, value)


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # cancelled: the request was cut at the drain deadline
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class WSGIMiddleware(ControllerMiddleware):
    """Counts in-flight requests for the controller and answers its probes (any WSGI server).

    While the service drains, every response gets ``Connection: close`` so
    keep-alive clients reconnect (to another replica) for their next request.
    A request is in flight while the application works on it: until it returns
    a list (the whole response), or until the server closes a streamed body.
    (The drain itself waits for connections, so a response still being written
    is never cut short by this count reaching zero.)
    """

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
