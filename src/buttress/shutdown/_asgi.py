"""The ASGI flavor: a middleware for the controller and uvicorn, driven programmatically.

uvicorn alone closes its listener the moment it is signalled, reports no
readiness and, by default, waits forever for open connections.  Here uvicorn
runs on a background thread with its own signal handling switched off; the
controller on the main thread owns the signals and tells it when to stop
accepting, and cuts what is left at the drain deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

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


def serve_asgi(
    app: ASGIApp,
    *,
    host: str = "0.0.0.0",
    port: int = 8000,
    controller: GracefulShutdown | None = None,
    handle_signals: bool = True,
    **uvicorn_options: Any,
) -> int:
    """Serve ``app`` under uvicorn until SIGTERM/SIGINT, drain it, return the exit code.

    ``sys.exit(serve_asgi(app, port=8080))`` is a complete service.  Extra
    keyword arguments go to ``uvicorn.Config``.  Raises
    :class:`PortInUseError` naming the port if it is taken.
    """
    controller = controller if controller is not None else GracefulShutdown()
    budget = controller.budget
    # uvicorn's own deadline is only a backstop: the controller cuts at drain_timeout.
    uvicorn_options.setdefault("timeout_graceful_shutdown",
                               math.ceil(budget.drain_timeout + budget.cleanup) + 1)
    # Outlive a load balancer's idle timeout, as the WSGI server does; the drain closes idle
    # connections itself, so a long keep-alive never delays the exit.
    uvicorn_options.setdefault("timeout_keep_alive", 15)
    server = ASGIServer(ASGIMiddleware(app, controller), host=host, port=port, **uvicorn_options)
    return controller.run(server, handle_signals=handle_signals)


class ASGIMiddleware:
    """Counts in-flight HTTP requests for the controller and answers its probes.

    While the service drains, responses get ``Connection: close``.  A request
    cut at the drain deadline (its task cancelled) is answered 503 with
    ``Connection: close`` if its response had not started, and counted as
    aborted; one cut mid-response can only have its connection closed.
    Lifespan and websocket scopes pass straight through.
    """

    def __init__(self, app: ASGIApp, controller: GracefulShutdown) -> None:
        self.app = app
        self.controller = controller
        paths = controller.probe_paths
        self._probe_paths = frozenset((paths.live, paths.ready, paths.drain))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        controller = self.controller
        if scope["path"] in self._probe_paths:
            await self._probe(scope["path"], send)
            return
        response_started = False

        async def tracked_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                if controller.draining:
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
        answer = self.controller.probe(path)
        assert answer is not None
        status, content_type, body = answer
        headers = [(b"content-type", content_type.encode()),
                   (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store")]
        if self.controller.draining:
            headers.append(_CLOSE)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class ASGIServer:
    """uvicorn on a background thread, stopped step by step by the controller.

    The listening socket is bound here, in the constructor, so a taken port
    fails early with :class:`PortInUseError`.  Keyword arguments go to
    ``uvicorn.Config`` (``timeout_keep_alive``, ``http``, ``lifespan`` ...).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "0.0.0.0",
        port: int = 8000,
        backlog: int = 2048,
        startup_timeout: float = 60.0,
        **uvicorn_options: Any,
    ) -> None:
        import uvicorn

        self.host = host
        self.startup_timeout = startup_timeout
        self._sock = listen(host, port, backlog)
        self.port: int = self._sock.getsockname()[1]
        uvicorn_options.setdefault("log_config", None)  # logging belongs to the application
        uvicorn_options.setdefault("access_log", False)
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
        while state.connections and self.serving():
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
            self._sock.close()
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
            self._server.run(sockets=[self._sock])
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
