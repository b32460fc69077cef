"""A keep-alive HTTP/1.1 client connection for the benchmarks' load generators.

Responses are parsed by httptools (llhttp, uvicorn's C parser: buttress parses
no HTTP by hand), and the client's own cost per request stays a few
microseconds, the same for every server it measures: a slow client would set
the pace on a 2-core machine and hide the servers' differences.
"""

from __future__ import annotations

import socket
from types import TracebackType

import httptools

__all__ = ["KeepAliveConnection"]


class KeepAliveConnection:
    """Requests one after another on one connection; each returns ``(status, body)``."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._host = f"Host: {host}:{port}\r\n".encode()
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._complete = False

    def request(self, method: str, target: str, body: bytes = b"",
                content_type: str = "application/json") -> tuple[int, bytes]:
        head = b"%s %s HTTP/1.1\r\n%s" % (method.encode(), target.encode(), self._host)
        if body or method not in ("GET", "HEAD"):
            head += b"Content-Type: %s\r\nContent-Length: %d\r\n" % (
                content_type.encode(), len(body))
        self._body, self._complete = [], False
        self._sock.sendall(head + b"\r\n" + body)
        while not self._complete:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection mid-response")
            self._parser.feed_data(data)
        return self._parser.get_status_code(), b"".join(self._body)

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> KeepAliveConnection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
