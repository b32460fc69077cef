"""Real gateway and worker processes for the service tests, and the handlers they run.

The handlers record every run in Redis (``HINCRBY <queue>:runs <id> 1`` and the
pid that ran it), which is what "handled exactly once" is checked against.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import redis

from buttress.testing import free_port

_TESTS = os.path.dirname(os.path.abspath(__file__))
_clients: dict[str, Any] = {}


def _client() -> Any:
    url = os.environ["BUTTRESS_REDIS_URL"]
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, socket_timeout=10)
    return _clients[url]


def record(payload: Any) -> None:
    """The side effect under test: count runs per id, and remember which process ran it."""
    queue = os.environ["BUTTRESS_QUEUE"]
    pipe = _client().pipeline(transaction=True)
    pipe.hincrby(f"{queue}:runs", payload["n"], 1)
    pipe.hincrby(f"{queue}:runs_by:{os.getpid()}", payload["n"], 1)
    pipe.rpush(f"{queue}:order", payload["tenant"])
    pipe.execute()


def slow(payload: Any) -> None:
    time.sleep(float(payload.get("seconds", 0.5)))
    record(payload)


HANDLERS = {"record": record, "slow": slow}


def service_env(redis_url: str, queue: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, env.get("PYTHONPATH", "")) if p)
    env.update(BUTTRESS_REDIS_URL=redis_url, BUTTRESS_QUEUE=queue,
               BUTTRESS_SERVICE_HANDLERS="service_support:HANDLERS")
    env.update(extra)
    return env


class _Process:
    process: subprocess.Popen[bytes]

    def terminate(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Gateway(_Process):
    """A ``python -m buttress serve`` process on a free loopback port."""

    def __init__(self, redis_url: str, queue: str, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None, log: Any = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "buttress", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), "--tasks", "record,slow", *args]
        self.process = subprocess.Popen(
            command, env=service_env(redis_url, queue, **(env or {})),
            stdout=log or subprocess.DEVNULL, stderr=log or subprocess.PIPE)

    def wait_ready(self, timeout: float = 30.0) -> Gateway:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"gateway exited {self.process.returncode}: {err}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"gateway on port {self.port} not ready in {timeout}s")


class Worker(_Process):
    """A ``python -m buttress worker`` process running the service handlers."""

    def __init__(self, redis_url: str, queue: str, *args: str, env: dict[str, str] | None = None,
                 log: Any = None) -> None:
        command = [sys.executable, "-m", "buttress", "worker", "--redis", redis_url,
                   "--queue", queue, "--handlers", "buttress.service.worker:handlers", *args]
        self.process = subprocess.Popen(command, env=service_env(redis_url, queue, **(env or {})),
                                        stdout=log or subprocess.DEVNULL,
                                        stderr=log or subprocess.DEVNULL)
        self.client_name = f"buttress-worker:{queue}:{self.process.pid}"

    def serving(self, client: Any) -> bool:
        """True once the worker talks to Redis (its signal handlers are installed by then)."""
        return any(entry.get("name") == self.client_name for entry in client.client_list())

