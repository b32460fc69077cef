"""The WSGI flavor: a middleware for the controller and a draining HTTP/1.1 server.

The server is the standard library's ``ThreadingHTTPServer`` (one thread per
connection) with a small WSGI gateway speaking HTTP/1.1 keep-alive, because
``wsgiref`` closes every connection after one response and so has nothing to
drain.  No dependency beyond the standard library.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from buttress.shutdown._lifecycle import GracefulShutdown, listen

__all__ = ["WSGIMiddleware", "WSGIServer", "serve_wsgi"]

logger = logging.getLogger("buttress.shutdown")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_MAX_DISCARD = 64 * 1024  # unread request body we skip to keep a connection; more -> close


def serve_wsgi(
    app: WSGIApp,
    *,
    host: str = "0.0.0.0",
    port: int = 8000,
    controller: GracefulShutdown | None = None,
    handle_signals: bool = True,
) -> int:
    """Serve ``app`` until SIGTERM/SIGINT, drain it gracefully, return the exit code.

    ``sys.exit(serve_wsgi(app, port=8080))`` is a complete service.  Raises
    :class:`PortInUseError` naming the port if it is taken.
    """
    controller = controller if controller is not None else GracefulShutdown()
    server = WSGIServer(WSGIMiddleware(app, controller), host=host, port=port)
    return controller.run(server, handle_signals=handle_signals)


class WSGIMiddleware:
    """Counts in-flight requests for the controller and answers its probes.

    While the service drains, every response gets ``Connection: close`` so
    keep-alive clients reconnect (to another replica) for their next request.
    A request is in flight while the application works on it: until it returns
    a list (the whole response), or until the server closes a streamed body.
    (The drain itself waits for connections, so a response still being written
    is never cut short by this count reaching zero.)
    """

    def __init__(self, app: WSGIApp, controller: GracefulShutdown) -> None:
        self.app = app
        self.controller = controller
        paths = controller.probe_paths
        self._probe_paths = frozenset((paths.live, paths.ready, paths.drain))

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        controller = self.controller
        if environ.get("PATH_INFO") in self._probe_paths:
            return self._probe(environ["PATH_INFO"], start_response)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if controller.draining:
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
        answer = self.controller.probe(path)
        assert answer is not None
        status, content_type, body = answer
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   ("Cache-Control", "no-store")]
        if self.controller.draining:
            headers.append(("Connection", "close"))
        start_response("200 OK" if status == 200 else f"{status} Service Unavailable", headers)
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


# -- the server ------------------------------------------------------------------

IDLE, ACTIVE = "idle", "active"


class _Connection:
    """One client connection: waiting for a request (idle) or reading/answering one."""

    __slots__ = ("closing", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = ACTIVE
        self.closing = False  # set by the drain: answer what has arrived, then close


class WSGIServer:
    """A draining HTTP/1.1 keep-alive WSGI server on ``ThreadingHTTPServer``.

    Binding happens in the constructor, so a taken port fails early with
    :class:`PortInUseError`.  :meth:`start` serves on a background thread; the
    rest is driven by :class:`GracefulShutdown`.

    Closing idle keep-alive connections races with a client sending its next
    request on one.  Each connection is *idle* while its thread waits for the
    first byte of the next request and *active* from the moment that byte is
    there; both transitions and the drain's decision take one lock:

    1. the connection thread marks itself idle, then blocks in ``peek(1)``;
    2. the drain, under the lock, picks the idle connections, marks them
       closing and shuts down their *read* side only (``SHUT_RD``);
    3. a thread blocked in ``peek`` wakes with end-of-file and closes; if the
       request's bytes had already arrived (in the kernel or our buffer),
       ``peek`` returns them instead, the thread marks itself active and answers
       that request with ``Connection: close`` on the still-open write side.

    So no request whose bytes reached the server's socket first is dropped; one
    still on the wire when the socket closes is refused, which is what HTTP keep-alive clients
    retry (and, by then, the drain delay has sent everyone ``Connection: close``).
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        host: str = "0.0.0.0",
        port: int = 8000,
        backlog: int = 1024,
        idle_timeout: float = 15.0,
    ) -> None:
        self.app = app
        self.host = host
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._connections: set[_Connection] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._counts = {"connections_total": 0, "idle_closed": 0, "aborted": 0}
        sock = listen(host, port, backlog)
        handler = type("Handler", (_Handler,), {"timeout": idle_timeout})
        httpd = _HTTPServer(sock.getsockname()[:2], handler, bind_and_activate=False)
        httpd.socket.close()
        httpd.socket = sock  # the same listener, and the same port-in-use error, as ASGI
        httpd.server_name, httpd.server_port = host, sock.getsockname()[1]
        httpd.wsgi = self
        self._httpd = httpd
        self.port: int = httpd.server_port

    # -- driven by the controller -----------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="buttress-wsgi-accept",
                                        daemon=True)
        self._thread.start()
        logger.info("WSGI server listening on http://%s:%d", self.host, self.port)

    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop_accepting(self) -> None:
        with self._lock:
            self._stopping = True
        # Linux stops listening at once on shutdown(); the accept loop then takes up to its
        # poll interval to notice, and connections must not queue up meanwhile.
        _shutdown(self._httpd.socket, socket.SHUT_RDWR)
        if self.serving():
            self._httpd.shutdown()
        self._httpd.server_close()  # new connections are refused from here on
        closed = self._close_idle_connections()
        logger.info("stopped accepting; closed %d idle keep-alive connection(s)", closed)

    def _close_idle_connections(self) -> int:
        """Steps 2 and 3 of the race in the class docstring; busy connections close later."""
        with self._lock:
            idle = [c for c in self._connections if c.state == IDLE and not c.closing]
            for conn in self._connections:
                conn.closing = True
            for conn in idle:
                # Read side only: a request that already arrived can still be answered.
                _shutdown(conn.sock, socket.SHUT_RD)
            self._counts["idle_closed"] += len(idle)
        return len(idle)

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._connections:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def abort(self) -> int:
        with self._lock:
            busy = [c for c in self._connections if c.state == ACTIVE]
            for conn in busy:
                _shutdown(conn.sock, socket.SHUT_RDWR)
            self._counts["aborted"] += len(busy)
        return len(busy)

    def close(self, timeout: float) -> None:
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            idle = sum(1 for c in self._connections if c.state == IDLE)
            return {**self._counts, "open": len(self._connections), "idle": idle,
                    "stopping": self._stopping}

    def _serve(self) -> None:
        try:
            self._httpd.serve_forever(poll_interval=0.05)
        except Exception:
            logger.exception("WSGI accept loop failed")

    # -- called by connection threads -----------------------------------------------

    def _opened(self, sock: socket.socket) -> _Connection:
        conn = _Connection(sock)
        with self._lock:
            conn.closing = self._stopping
            self._connections.add(conn)
            self._counts["connections_total"] += 1
        return conn

    def _closed(self, conn: _Connection) -> None:
        with self._changed:
            self._connections.discard(conn)
            self._changed.notify_all()

    def _idle(self, conn: _Connection) -> bool:
        """Mark ``conn`` idle; False if it should close instead of waiting."""
        with self._lock:
            if conn.closing:
                # Accepted as the drain began, or asked to close while busy: answer only
                # a request that has already arrived, then close.
                return _readable_now(conn.sock)
            conn.state = IDLE
            return True

    def _active(self, conn: _Connection) -> None:
        with self._lock:
            conn.state = ACTIVE


def _readable_now(sock: socket.socket) -> bool:
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer or by its own thread
        sock.shutdown(how)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a cut request's thread must not hold up the exit
    block_on_close = False
    wsgi: WSGIServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("error on connection from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    """One connection: a keep-alive loop of WSGI requests (see WSGIServer)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in one write anyway
    server: _HTTPServer
    conn: _Connection

    def handle(self) -> None:
        wsgi = self.server.wsgi
        conn = self.conn = wsgi._opened(self.connection)
        try:
            while wsgi._idle(conn):
                try:
                    # Blocks until the next request's first byte, or end-of-file.
                    arrived = self.rfile.peek(1)  # type: ignore[attr-defined]
                except (OSError, ValueError):  # idle timeout, reset, or closed under us
                    return
                if not arrived:
                    return
                wsgi._active(conn)
                self.close_connection = True
                self.handle_one_request()
                if self.close_connection or conn.closing:
                    return
        except OSError as exc:  # the client went away, or the drain cut the request
            logger.debug("connection from %s ended: %r", self.client_address, exc)
        finally:
            wsgi._closed(conn)

    def handle_one_request(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.send_error(414)
            return
        if not self.raw_requestline or not self.parse_request():
            self.close_connection = True
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            # RFC 9112 6.3: a server may answer 411 to a body without Content-Length.
            self.send_error(411, "chunked request bodies are not supported; send Content-Length")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.send_error(400, "bad Content-Length")
            return
        body = _Input(self.rfile, length)
        _Response(self, body).run(self.server.wsgi.app)
        if body.remaining > _MAX_DISCARD:
            self.close_connection = True
        elif body.remaining:
            body.read()

    def log_message(self, format: str, *args: Any) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s", self.address_string(), format % args)


class _Input:
    """``wsgi.input``: the request body, never reading past Content-Length."""

    def __init__(self, rfile: Any, length: int) -> None:
        self._rfile = rfile
        self.remaining = length

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self.remaining:
            size = self.remaining
        data: bytes = self._rfile.read(size) if size else b""
        self.remaining -= len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self.remaining:
            size = self.remaining
        data: bytes = self._rfile.readline(size) if size else b""
        self.remaining -= len(data)
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


class _Response:
    """One WSGI call: environ in, status line, headers and body out (PEP 3333)."""

    def __init__(self, handler: _Handler, body: _Input) -> None:
        self.handler = handler
        self.input = body
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.headers_sent = False
        self.length: int | None = None  # Content-Length, if known
        self.length_given = False  # the application sent the Content-Length header itself
        self.chunked = False
        self.no_body = handler.command == "HEAD"

    def run(self, app: WSGIApp) -> None:
        try:
            result = app(self._environ(), self.start_response)
        except Exception:
            logger.exception("error in WSGI application")
            self._fail()
            return
        try:
            if isinstance(result, list | tuple) and self.length is None and not self.headers_sent:
                self.length = sum(len(chunk) for chunk in result)
            for chunk in result:
                if chunk:
                    self.write(chunk)
            self._finish()
        except OSError:
            raise  # the connection is gone; handle() ends it
        except Exception:
            logger.exception("error in WSGI application")
            self._fail()
        finally:
            _close(result)

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise RuntimeError("start_response called twice without exc_info")
        if not isinstance(status, str) or len(status) < 4 or not status[:3].isdigit():
            raise ValueError(f"status must look like '200 OK', got {status!r}")
        self.status = status
        self.headers = list(headers)
        self.length = None
        self.length_given = False
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == "content-length":
                self.length = int(value)
                self.length_given = True
            elif lowered == "connection" and value.lower() == "close":
                self.handler.close_connection = True
        return self.write

    def write(self, data: bytes) -> None:
        if self.status is None:
            raise RuntimeError("write() before start_response()")
        if not self.headers_sent:
            self._send_headers(data)
            return
        self._send_body(data)

    def _send_headers(self, first: bytes) -> None:
        handler = self.handler
        assert self.status is not None
        code = int(self.status[:3])
        bodiless = code < 200 or code in (204, 304)
        if bodiless:
            self.no_body = True
        headers = self.headers
        if self.length is not None and not self.length_given and not bodiless:
            headers = [*headers, ("Content-Length", str(self.length))]
        if handler.conn.closing:  # the drain asked this connection to close after this reply
            handler.close_connection = True
        if self.length is None and not self.no_body:
            if handler.request_version == "HTTP/1.1":
                self.chunked = True
                headers = [*headers, ("Transfer-Encoding", "chunked")]
            else:
                handler.close_connection = True
        if handler.close_connection and not any(n.lower() == "connection" for n, _ in headers):
            headers = [*headers, ("Connection", "close")]
        lines = [f"{handler.protocol_version} {self.status}\r\n",
                 f"Server: {handler.version_string()}\r\n",
                 f"Date: {handler.date_time_string()}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        lines.append("\r\n")
        self.headers_sent = True
        head = "".join(lines).encode("latin-1")
        if handler.command != "HEAD":
            handler.log_request(code)
        handler.wfile.write(head + self._frame(first))

    def _send_body(self, data: bytes) -> None:
        if data:
            self.handler.wfile.write(self._frame(data))

    def _frame(self, data: bytes) -> bytes:
        if self.no_body or not data:
            return b""
        if self.chunked:
            return b"%x\r\n%s\r\n" % (len(data), data)
        return data

    def _finish(self) -> None:
        if self.status is None:
            raise RuntimeError("the WSGI application returned without calling start_response")
        if not self.headers_sent:
            if self.length is None:
                self.length = 0
            self._send_headers(b"")
        if self.chunked:
            self.handler.wfile.write(b"0\r\n\r\n")

    def _fail(self) -> None:
        """A 500 if nothing was sent yet; otherwise the only honest signal is closing."""
        self.handler.close_connection = True
        if not self.headers_sent:
            self.status, self.headers, self.length = "500 Internal Server Error", [
                ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "22")], 22
            self.no_body = self.handler.command == "HEAD"
            self._send_headers(b"Internal Server Error\n")

    def _environ(self) -> dict[str, Any]:
        handler = self.handler
        path, _, query = handler.path.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": handler.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path, "iso-8859-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": handler.server.server_name,
            "SERVER_PORT": str(handler.server.server_port),
            "SERVER_PROTOCOL": handler.request_version,
            "REMOTE_ADDR": handler.client_address[0],
            "REMOTE_PORT": str(handler.client_address[1]),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": self.input,
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in handler.headers.items():
            key = name.upper().replace("-", "_")
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[key] = value
                continue
            key = "HTTP_" + key
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ
