"""A keep-alive HTTP/1.1 client connection for the benchmarks' load generators.

h11 writes the requests and parses the responses (buttress parses no HTTP by
hand); a blocking socket with TCP_NODELAY keeps the client's own cost per
request small and the same for every server it measures.
"""

from __future__ import annotations

import socket
from types import TracebackType

import h11

__all__ = ["KeepAliveConnection"]


class KeepAliveConnection:
    """Requests one after another on one connection; each returns ``(status, body)``."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self._host = host
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._http = h11.Connection(h11.CLIENT)

    def request(self, method: str, target: str, body: bytes = b"",
                headers: tuple[tuple[str, str], ...] = ()) -> tuple[int, bytes]:
        head = [("Host", self._host), *headers]
        if body or method not in ("GET", "HEAD"):
            head.append(("Content-Length", str(len(body))))
        data = self._http.send(h11.Request(method=method, target=target, headers=head))
        if body:
            data += self._http.send(h11.Data(data=body))
        self._sock.sendall(data + self._http.send(h11.EndOfMessage()))
        status, chunks = 0, []
        while True:
            event = self._http.next_event()
            if event is h11.NEED_DATA:
                received = self._sock.recv(65536)
                if not received:
                    raise ConnectionError("the server closed the connection mid-response")
                self._http.receive_data(received)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._http.start_next_cycle()
                return status, b"".join(chunks)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> KeepAliveConnection:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
