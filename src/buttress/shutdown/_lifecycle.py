"""The lifecycle controller shared by every server flavor, and the budget it spends."""

from __future__ import annotations

import asyncio
import enum
import errno
import itertools
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from buttress._validate import (
    parse_number_setting,
    require_callable,
    require_int,
    require_number,
    require_str,
)
from buttress.errors import PortInUseError

__all__ = [
    "DRAIN_DELAY_ENV",
    "DRAIN_TIMEOUT_ENV",
    "GRACE_PERIOD_ENV",
    "PRE_STOP_ENV",
    "DrainSignal",
    "ExitCode",
    "GracefulShutdown",
    "PortInUseError",
    "ProbePaths",
    "ShutdownBudget",
    "State",
]

logger = logging.getLogger("buttress.shutdown")

GRACE_PERIOD_ENV = "BUTTRESS_GRACE_PERIOD"  # mirrors the pod's terminationGracePeriodSeconds
PRE_STOP_ENV = "BUTTRESS_PRE_STOP"  # seconds the preStop hook takes before SIGTERM arrives
DRAIN_DELAY_ENV = "BUTTRESS_DRAIN_DELAY"  # sets drain_delay (seconds), e.g. under gunicorn
DRAIN_TIMEOUT_ENV = "BUTTRESS_DRAIN_TIMEOUT"  # sets drain_timeout (seconds)
METRICS_PATH = "/metrics"  # answered when the middleware is given a prometheus-client registry


class State(str, enum.Enum):
    """Where a service is in its life; it only ever moves forward."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class ExitCode(enum.IntEnum):
    """Process exit codes of a service run by :meth:`GracefulShutdown.run`."""

    CLEAN = 0  # every accepted request completed and every cleanup hook finished
    SERVER_FAILED = 1  # the server stopped on its own (crash), not because it was told to
    DRAIN_TIMED_OUT = 3  # requests were still running at the drain deadline and were cut
    CLEANUP_FAILED = 4  # a cleanup hook raised or overran its budget
    FORCED = 130  # a second SIGINT: immediate exit, nothing drained (128 + SIGINT)


def port_in_use(host: str, port: int, cause: OSError) -> PortInUseError:
    """The error both flavors raise for EADDRINUSE, naming the port."""
    error = PortInUseError(cause.errno, f"cannot listen on {host}:{port}: port {port} is "
                           "already in use (another process is listening there)")
    error.__cause__ = cause
    return error


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket for either flavor; PortInUseError names a taken port."""
    require_int("port", port, minimum=0, maximum=65535)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP,
    # and without it uvicorn's separate header and body writes meet Nagle and delayed ACKs
    # (40 ms per keep-alive request).  socket.create_server leaves proto at 0.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise port_in_use(host, port, exc) from exc
        raise
    return sock


def seconds(name: str, value: object) -> float:
    """``value`` as a finite number of seconds >= 0; TypeError or ValueError naming ``name``."""
    return require_number(name, value, minimum=0)


@dataclass(frozen=True)
class ShutdownBudget:
    """How the pod's grace period is spent, in seconds.

    Kubernetes starts one clock when it decides to stop a pod: the preStop hook
    runs, then SIGTERM, and SIGKILL follows ``terminationGracePeriodSeconds``
    after the start whatever the process is doing.  The budget splits that
    period so the process always exits on its own first::

        pre_stop | drain_delay | drain_timeout | cleanup | margin
                 ^ SIGTERM     ^ listener closed          ^ exit   ^ SIGKILL

    ``drain_delay``: readiness is false but requests are still served while
    load balancers learn the endpoint is gone.  ``drain_timeout``: in-flight
    requests finish; whatever is left is cut.  ``cleanup``: registered hooks
    run.  ``margin``: slack for interpreter exit and a loaded machine.
    """

    drain_delay: float = 5.0
    drain_timeout: float = 20.0
    cleanup: float = 3.0
    margin: float = 2.0
    pre_stop: float = 0.0

    def __post_init__(self) -> None:
        for name in ("drain_delay", "drain_timeout", "cleanup", "margin", "pre_stop"):
            object.__setattr__(self, name, seconds(name, getattr(self, name)))

    @property
    def grace_period(self) -> float:
        """The termination grace period this budget needs, preStop included."""
        return self.pre_stop + self.drain_delay + self.drain_timeout + self.cleanup + self.margin

    @classmethod
    def from_grace_period(
        cls,
        grace_period: float,
        *,
        pre_stop: float = 0.0,
        drain_delay: float | None = None,
        drain_timeout: float | None = None,
        cleanup: float | None = None,
        margin: float | None = None,
    ) -> ShutdownBudget:
        """Split ``grace_period`` (the pod's ``terminationGracePeriodSeconds``).

        Parts given explicitly are kept; of the time left after ``pre_stop``
        the defaults take a 10% margin (0.5 s to 5 s, at most half), 20% drain delay (at
        most 5 s), 10% cleanup (at most 5 s), and the drain timeout gets the
        rest.  Parts that do not fit raise ValueError.
        """
        total = seconds("grace_period", grace_period)
        available = total - seconds("pre_stop", pre_stop)
        if available <= 0:
            raise ValueError(f"pre_stop={pre_stop!r} leaves nothing of "
                             f"grace_period={grace_period!r}")
        parts = {
            "margin": (min(max(0.1 * available, 0.5), 5.0, 0.5 * available)
                       if margin is None else margin),
            "drain_delay": min(0.2 * available, 5.0) if drain_delay is None else drain_delay,
            "cleanup": min(0.1 * available, 5.0) if cleanup is None else cleanup,
        }
        fixed = {name: seconds(name, value) for name, value in parts.items()}
        if drain_timeout is None:
            rest = sum(fixed.values())
            fixed["drain_timeout"] = available - rest
            if fixed["drain_timeout"] < 0:
                raise ValueError(f"drain_delay + cleanup + margin = {rest:g}s "
                                 f"exceed the {available:g}s left of grace_period={grace_period!r}")
        else:
            fixed["drain_timeout"] = seconds("drain_timeout", drain_timeout)
        budget = cls(pre_stop=pre_stop, **fixed)
        if budget.grace_period > total + 1e-9:
            raise ValueError(f"pre_stop + drain_delay + drain_timeout + cleanup + margin = "
                             f"{budget.grace_period:g}s exceed grace_period={grace_period!r}")
        return budget

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        drain_delay: float | None = None,
        drain_timeout: float | None = None,
        cleanup: float | None = None,
        margin: float | None = None,
    ) -> ShutdownBudget:
        """The budget from ``BUTTRESS_GRACE_PERIOD`` and ``BUTTRESS_PRE_STOP``, if set.

        Without ``BUTTRESS_GRACE_PERIOD`` the class defaults apply.
        ``BUTTRESS_DRAIN_DELAY`` and ``BUTTRESS_DRAIN_TIMEOUT`` set those parts;
        explicit arguments (numbers: parse command-line strings with
        ``buttress._validate.parse_number_setting``) override everything.
        """
        env = os.environ if environ is None else environ
        from_variables = {
            name: parse_number_setting(variable, env[variable], minimum=0)
            for name, variable in (("drain_delay", DRAIN_DELAY_ENV),
                                   ("drain_timeout", DRAIN_TIMEOUT_ENV))
            if env.get(variable)
        }
        drain_delay = from_variables.get("drain_delay") if drain_delay is None else drain_delay
        drain_timeout = (from_variables.get("drain_timeout") if drain_timeout is None
                         else drain_timeout)
        overrides = {"drain_delay": drain_delay, "drain_timeout": drain_timeout,
                     "cleanup": cleanup, "margin": margin}
        given = {name: value for name, value in overrides.items() if value is not None}
        grace = env.get(GRACE_PERIOD_ENV)
        pre_stop_text = env.get(PRE_STOP_ENV, "0")
        pre_stop = parse_number_setting(PRE_STOP_ENV, pre_stop_text, minimum=0)
        if not grace:
            return cls(pre_stop=pre_stop, **given)
        try:
            return cls.from_grace_period(
                parse_number_setting(GRACE_PERIOD_ENV, grace, minimum=0),
                pre_stop=pre_stop, **given)
        except ValueError as exc:
            raise ValueError(f"{exc} (from {GRACE_PERIOD_ENV}={grace!r}, "
                             f"{PRE_STOP_ENV}={pre_stop_text!r})") from None


@dataclass(frozen=True)
class ProbePaths:
    """Where the library answers probes; the application never sees these paths."""

    live: str = "/livez"
    ready: str = "/readyz"
    drain: str = "/drainz"

    def __post_init__(self) -> None:
        for name in ("live", "ready", "drain"):
            value = require_str(f"probe path {name}", getattr(self, name))
            if not value.startswith("/"):
                raise ValueError(f"probe path {name} must be a string starting with '/', "
                                 f"got {value!r}")
        if len({self.live, self.ready, self.drain}) != 3:
            raise ValueError(f"probe paths must differ, got {self!r}")


class DrainSignal:
    """A flag set once, when the drain begins: poll it, wait on it, or await it.

    ``controller.draining`` is one.  A stream (server-sent events, a long
    response, a websocket) ends itself with it before the drain deadline::

        while not controller.draining:          # a thread-safe flag, from any thread
            yield next_event()
        # or, in a coroutine: await controller.draining (like asyncio.Event.wait())
        # or, on a thread:    controller.draining.wait(timeout) -> bool (like threading.Event)

    Setting it never takes a lock: the controller sets it from a signal handler,
    which may interrupt a thread holding any lock.  Awaiting works from any
    event loop (uvicorn's, the application's own), several at once.
    """

    __slots__ = ("_is_set", "_waiters")

    def __init__(self) -> None:
        self._is_set = False
        self._waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[bool]]] = deque()

    def __bool__(self) -> bool:
        return self._is_set

    def __repr__(self) -> str:
        return f"<DrainSignal {'set' if self._is_set else 'unset'}>"

    def is_set(self) -> bool:
        return self._is_set

    def set(self) -> None:
        """Set the flag and wake every waiter (the controller calls this; once is enough)."""
        self._is_set = True
        while self._waiters:
            try:
                loop, future = self._waiters.popleft()
            except IndexError:  # another thread woke the last one
                break
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future)

    def wait(self, timeout: float | None = None) -> bool:
        """Block this thread until set or ``timeout`` seconds pass; True if set.

        It polls (every 20 ms) instead of waiting on a lock-based Event, which a
        signal handler setting it could deadlock on.
        """
        deadline = None if timeout is None else time.monotonic() + seconds("timeout", timeout)
        while not self._is_set:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    async def wait_async(self) -> bool:
        """Wait (in a coroutine) until set; ``await signal`` does the same."""
        if self._is_set:
            return True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._waiters.append((loop, future))
        if self._is_set:  # set() ran between the check and the append: do not miss it
            _resolve(future)
        return await future

    def __await__(self) -> Any:
        return self.wait_async().__await__()


def _resolve(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(True)


class Server(Protocol):
    """What a server flavor gives the controller (see ``_wsgi`` and ``_asgi``)."""

    def start(self) -> None:
        """Begin serving in the background; return once the listener accepts."""

    def serving(self) -> bool:
        """False once the server stopped on its own (a crash)."""

    def stop_accepting(self) -> None:
        """Close the listener and idle keep-alive connections; busy ones close after reply."""

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no connection is open; False at the deadline."""

    def abort(self) -> int:
        """Cut the requests still running; return how many."""

    def close(self, timeout: float) -> None:
        """Release what is left (threads, event loop) within ``timeout``."""


@dataclass
class _Hook:
    name: str
    call: Callable[[], object]
    timeout: float | None


@dataclass
class _HookResult:
    name: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class _Record:
    """What happened, for stats() and the drain-status endpoint."""

    was_ready: bool = False
    requests_aborted: int = 0
    drain_reason: str = ""
    drain_started: float | None = None  # time.monotonic()
    drain_finished: float | None = None
    drained: bool | None = None  # None until the drain deadline is decided
    exit_code: int | None = None
    hooks: list[_HookResult] = field(default_factory=list)


class GracefulShutdown:
    """The lifecycle of one HTTP service: STARTING -> READY -> DRAINING -> STOPPED.

    One controller serves every flavor.  Flavors adapt it twice: a middleware
    (``WSGIMiddleware``, ``ASGIMiddleware``) reports requests through
    :meth:`request_started`/:meth:`request_finished`, answers the probes from
    :meth:`probe` and adds ``Connection: close`` while ``draining``; a
    server (``WSGIServer``, ``ASGIServer``) does what :meth:`run` tells it.

    :meth:`run` is the whole sequence after SIGTERM (or SIGINT):

    1. readiness turns false at once, liveness stays true;
    2. requests are still served for ``budget.drain_delay`` seconds, each
       response with ``Connection: close``, while endpoints propagate;
    3. the listener closes and idle keep-alive connections are closed;
    4. in-flight requests get ``budget.drain_timeout`` seconds; the rest are
       cut, counted and logged;
    5. cleanup hooks run, newest first, within ``budget.cleanup`` seconds;
    6. the exit code says how it went (:class:`ExitCode`).

    A second SIGINT (any of ``force_signals``) while draining exits the
    process at once with ``forced_exit_code``.
    """

    def __init__(
        self,
        budget: ShutdownBudget | None = None,
        *,
        probe_paths: ProbePaths | None = None,
        drain_timeout_exit_code: int = ExitCode.DRAIN_TIMED_OUT,
        forced_exit_code: int = ExitCode.FORCED,
        force_signals: tuple[int, ...] = (signal.SIGINT,),
    ) -> None:
        for name, code in (("drain_timeout_exit_code", drain_timeout_exit_code),
                           ("forced_exit_code", forced_exit_code)):
            require_int(name, code, minimum=1, maximum=255)
        if budget is not None and not isinstance(budget, ShutdownBudget):
            raise TypeError(f"budget must be a ShutdownBudget, got {type(budget).__name__}: "
                            f"{budget!r}")
        if probe_paths is not None and not isinstance(probe_paths, ProbePaths):
            raise TypeError(f"probe_paths must be a ProbePaths, got "
                            f"{type(probe_paths).__name__}: {probe_paths!r}")
        if isinstance(force_signals, (str, bytes)) or not hasattr(force_signals, "__iter__"):
            raise TypeError(f"force_signals must be a tuple of signal numbers, got "
                            f"{type(force_signals).__name__}: {force_signals!r}")
        force_signals = tuple(force_signals)
        for index, signum in enumerate(force_signals):
            require_int(f"force_signals[{index}]", signum, minimum=1)
        self.budget = budget if budget is not None else ShutdownBudget()
        self.probe_paths = probe_paths if probe_paths is not None else ProbePaths()
        self.drain_timeout_exit_code = int(drain_timeout_exit_code)
        self.forced_exit_code = int(forced_exit_code)
        self.force_signals = tuple(force_signals)
        # Reentrant: a signal handler runs on the main thread, maybe while it holds the lock.
        self._lock = threading.RLock()
        # Requests are counted on every request, from any thread, without a lock (taking
        # one twice per request cost more than the rest of the tracking): deque.append/pop
        # and next() on itertools.count are each one atomic call in C.  One token in
        # _active per request in flight; _started counts requests, read by _requests_total.
        self._active: deque[None] = deque()
        self._started = itertools.count()
        self._started_reads = 0
        self._state = State.STARTING
        self._record = _Record()
        # Set once, from the moment a drain begins: `if controller.draining`, `await
        # controller.draining`, `controller.draining.wait(timeout)` (streams end themselves).
        self.draining = DrainSignal()
        # The same fact as a plain attribute: every response reads it (the middlewares).
        self._draining = False
        # Set when the in-flight requests are done (or were cut): what the preStop drain
        # endpoint waits for.  _drain_waiters counts the connections waiting on it, which
        # the servers leave out when they wait for connections to close.
        self.drained = DrainSignal()
        self._drain_waiters: deque[None] = deque()
        # What a preStop drain request does: begin the drain here; a gunicorn worker asks
        # its master instead, so that every worker drains.
        self.drain_requester: Callable[[], object] = lambda: self.begin_drain(
            "drain requested (preStop)")
        self._hooks: list[_Hook] = []
        self._previous_handlers: dict[int, Any] = {}

    # -- state ------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def mark_ready(self) -> None:
        """STARTING -> READY: startup is complete, readiness turns true."""
        with self._lock:
            if self._state is State.STARTING:
                self._state = State.READY
                self._record.was_ready = True
                logger.info("ready")

    def begin_drain(self, reason: str = "requested") -> bool:
        """Start the shutdown sequence; False if it had already begun."""
        with self._lock:
            if self._draining:
                return False
            self._state = State.DRAINING
            self._draining = True
            self.draining.set()
            self._record.drain_reason = reason
            self._record.drain_started = time.monotonic()
        logger.info("draining (%s): readiness is now false, %d request(s) in flight",
                    reason, self.in_flight)
        return True

    # -- requests (called by the middleware, on any thread) ----------------------------

    def request_started(self) -> None:
        self._active.append(None)
        next(self._started)

    def request_finished(self, *, aborted: bool = False) -> None:
        self._active.pop()
        if aborted:  # rare: only at the drain deadline
            with self._lock:
                self._record.requests_aborted += 1

    def _requests_total(self) -> int:
        with self._lock:
            # Reading the count with next() advances it too: take the reads back off.
            total = next(self._started) - self._started_reads
            self._started_reads += 1
        return total

    # -- probes -------------------------------------------------------------------

    def probe(self, path: str, metrics_registry: Any = None
              ) -> tuple[int, str, bytes] | None:
        """``(status, content type, body)`` if ``path`` is a probe path, else None.

        With a prometheus-client ``metrics_registry``, ``/metrics`` is one too.
        """
        paths = self.probe_paths
        if metrics_registry is not None and path == METRICS_PATH:
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return 200, CONTENT_TYPE_LATEST, generate_latest(metrics_registry)
        if path == paths.live:
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == paths.ready:
            if self._state is State.READY:
                return 200, "text/plain; charset=utf-8", b"ready\n"
            return 503, "text/plain; charset=utf-8", f"{self._state.value}\n".encode()
        if path == paths.drain:
            return 200, "application/json", json.dumps(self.drain_status()).encode()
        return None

    def drain_status(self) -> dict[str, Any]:
        """State, in-flight count and seconds since the drain began (None before)."""
        started = self._record.drain_started
        return {
            "state": self._state.value,
            "in_flight": self.in_flight,
            "draining_for": None if started is None else round(time.monotonic() - started, 3),
            "requests_aborted": self._record.requests_aborted,
        }

    def drain_waiters(self) -> int:
        """Connections waiting on a preStop drain request: the drain does not wait for them."""
        return len(self._drain_waiters)

    # -- cleanup hooks -------------------------------------------------------------

    def add_cleanup(
        self, hook: Callable[[], object], *, name: str | None = None, timeout: float | None = None
    ) -> None:
        """Run ``hook()`` after the drain, newest first (like ``atexit``).

        Each hook gets at most ``timeout`` seconds and never more than what is
        left of ``budget.cleanup``; one that overruns is logged and left behind
        (a thread cannot be killed), and the exit code reports it.  A task
        scheduler registers ``partial(scheduler.shutdown, drain=True, timeout=5)``.
        """
        require_callable("hook", hook)
        if name is not None:
            require_str("name", name)
        limit = None if timeout is None else seconds("timeout", timeout)
        label = name or getattr(hook, "__qualname__", None) or repr(hook)
        with self._lock:
            if self._state is State.STOPPED:
                raise RuntimeError(f"cannot add cleanup hook {label!r}: the service has stopped")
            self._hooks.append(_Hook(label, hook, limit))

    def run_cleanup(self, budget: float) -> bool:
        """Run the hooks within ``budget`` seconds; True if all finished without error."""
        deadline = time.monotonic() + budget
        with self._lock:
            hooks, self._hooks = list(reversed(self._hooks)), []
        ok = True
        for hook in hooks:
            left = max(0.0, deadline - time.monotonic())
            allowed = left if hook.timeout is None else min(left, hook.timeout)
            result = _run_hook(hook, allowed)
            self._record.hooks.append(result)
            ok = ok and result.ok
        return ok

    # -- signals --------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT start a graceful drain; a second SIGINT forces exit.

        Signal handlers belong to the main thread (Python runs them there and
        refuses to install them elsewhere), so calling this from another
        thread raises RuntimeError.  The previous handlers are kept for
        :meth:`restore_signal_handlers`.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "GracefulShutdown.install_signal_handlers() must be called from the main "
                f"thread, not {threading.current_thread().name!r}; run the service there "
                "or pass handle_signals=False and call begin_drain() yourself"
            )
        for signum in (signal.SIGTERM, signal.SIGINT, *self.force_signals):
            if signum not in self._previous_handlers:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def restore_signal_handlers(self) -> None:
        """Put back the handlers that were there before :meth:`install_signal_handlers`."""
        previous, self._previous_handlers = self._previous_handlers, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    @contextmanager
    def signal_handlers(self) -> Iterator[None]:
        self.install_signal_handlers()
        try:
            yield
        finally:
            self.restore_signal_handlers()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs on the main thread between two bytecodes, wherever it was: it takes only the
        # controller's reentrant lock, never an Event or Condition the main thread may hold.
        name = signal.Signals(signum).name
        if self.begin_drain(reason=name):
            return
        if signum in self.force_signals:
            logger.warning("%s while draining: forcing exit with code %d, %d request(s) "
                           "dropped", name, self.forced_exit_code, self.in_flight)
            for handler in logging.getLogger().handlers + logger.handlers:
                handler.flush()
            os._exit(self.forced_exit_code)
        logger.info("%s ignored: already %s", name, self._state.value)

    # -- the whole sequence -----------------------------------------------------------

    def run(self, server: Server, *, handle_signals: bool = True) -> int:
        """Serve until told to stop, drain, clean up; return the exit code.

        With ``handle_signals`` (the default) this must run on the main thread;
        otherwise something else calls :meth:`begin_drain`.
        """
        if self._state is State.STOPPED or self._record.was_ready:
            raise RuntimeError("GracefulShutdown.run() drives one service once; "
                               f"this one is already {self._state.value}")
        if handle_signals:
            self.install_signal_handlers()
        try:
            server.start()
            self.mark_ready()
            # Poll with sleep, not Event.wait: a signal handler that sets an Event can deadlock
            # on the Event's lock if it interrupts the main thread inside Event.wait.
            ticks = 0
            while not self._draining:
                time.sleep(0.05)
                ticks += 1
                if ticks % 5 == 0 and not server.serving():
                    self.begin_drain(reason="server stopped unexpectedly")
            return self._drain(server)
        finally:
            if handle_signals:
                self.restore_signal_handlers()

    def _drain(self, server: Server) -> int:
        budget = self.budget
        failed = not server.serving()
        # A service that never became ready was never routed to: nothing to wait out.
        if budget.drain_delay and not failed and self._record.was_ready:
            logger.info("serving for %.3gs more while endpoints propagate", budget.drain_delay)
            threading.Event().wait(budget.drain_delay)
        server.stop_accepting()
        logger.info("listener closed; waiting up to %.3gs for %d request(s)",
                    budget.drain_timeout, self.in_flight)
        drained = server.wait_idle(budget.drain_timeout)
        self._record.drained = drained  # before the cut: a preStop drain request reports it
        if not drained:
            cut = server.abort()
            logger.warning("drain timed out after %.3gs: cut %d request(s)",
                           budget.drain_timeout, cut)
            # The cut connections close promptly; do not let them eat the cleanup budget.
            server.wait_idle(min(1.0, budget.margin / 2))
        self.drained.set()  # a preStop drain request waiting on this answers now
        cleanup_started = time.monotonic()
        server.close(budget.cleanup)
        left = max(0.0, budget.cleanup - (time.monotonic() - cleanup_started))
        hooks_ok = self.run_cleanup(left)
        with self._lock:
            self._state = State.STOPPED
            self._record.drain_finished = time.monotonic()
        if failed:
            code = int(ExitCode.SERVER_FAILED)
        elif not drained:
            code = self.drain_timeout_exit_code
        elif not hooks_ok:
            code = int(ExitCode.CLEANUP_FAILED)
        else:
            code = int(ExitCode.CLEAN)
        self._record.exit_code = code
        started = self._record.drain_started or cleanup_started
        logger.info("stopped after %.3gs, exit code %d",
                    self._record.drain_finished - started, code)
        return code

    def stats(self) -> dict[str, Any]:
        record = self._record
        started, finished = record.drain_started, record.drain_finished
        return {
            "state": self._state.value,
            "in_flight": self.in_flight,
            "requests_total": self._requests_total(),
            "requests_aborted": record.requests_aborted,
            "drain_reason": record.drain_reason,
            "drained": record.drained,
            "drain_seconds": None if started is None or finished is None else finished - started,
            "exit_code": record.exit_code,
            "cleanup": [vars(result).copy() for result in record.hooks],
            "budget": vars(self.budget).copy(),
        }


def _run_hook(hook: _Hook, timeout: float) -> _HookResult:
    """Run one hook on a daemon thread so an overrun cannot hold up the exit."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = hook.call()
        except Exception as exc:  # reported, never swallowed: see the log and stats()
            outcome["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=target, name=f"buttress-cleanup:{hook.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    took = time.monotonic() - started
    if thread.is_alive():
        logger.error("cleanup hook %s overran its %.3gs budget; left running", hook.name, timeout)
        return _HookResult(hook.name, False, took, f"overran {timeout:.3g}s")
    if "error" in outcome:
        error = outcome["error"]
        logger.error("cleanup hook %s failed: %r", hook.name, error)
        return _HookResult(hook.name, False, took, repr(error))
    logger.info("cleanup hook %s done in %.3gs", hook.name, took)
    return _HookResult(hook.name, True, took, repr(outcome.get("value")))
