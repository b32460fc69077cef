"""gunicorn worker classes that run the buttress lifecycle in every worker.

Start gunicorn with the config module, which picks the worker class, derives
``graceful_timeout`` from the budget and checks the settings before anything
is served::

    gunicorn -c python:buttress.shutdown.gunicorn_conf app:app            # WSGI
    gunicorn -c python:buttress.shutdown.gunicorn_conf \\
        -k buttress.shutdown.gunicorn.ASGIWorker app:app                    # ASGI

How gunicorn stops, and what the workers do about it (gunicorn's
``Arbiter.stop``): on SIGTERM the master closes its own copy of the listening
sockets, sends SIGTERM to every worker and waits ``graceful_timeout`` seconds
before SIGKILL.  The workers still hold the listening sockets (they were
inherited at fork), so each worker runs the whole lifecycle itself, all from
the same moment: readiness turns false and it keeps accepting and serving for
``drain_delay``, then closes its listener and idle connections, waits for its
in-flight requests up to ``drain_timeout``, runs its cleanup hooks and reports
its exit code to the master, which exits with the worst one.  SIGINT or
SIGQUIT to the master is gunicorn's quick shutdown: the workers get SIGQUIT
and exit at once with 130.

Each worker serves with uvicorn, the same server path as ``serve_wsgi`` and
``serve_asgi`` (one drain, the same HTTP parser): :class:`WSGIWorker` runs a
WSGI application on a pool of ``--threads`` threads (32 when gunicorn's
default of 1 is left), :class:`ASGIWorker` an ASGI application.  Probes,
``/drainz`` and ``/metrics`` are answered by each worker.

The worker reports its code through a file in a directory the master made;
it exits 0 itself, because gunicorn reads a worker exit status of 3 or 4 as
"failed to boot" and halts.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from gunicorn.workers.base import Worker

from buttress.errors import ServerConfigError
from buttress.shutdown._asgi import ASGIMiddleware, ASGIServer
from buttress.shutdown._lifecycle import ExitCode, GracefulShutdown, ShutdownBudget
from buttress.shutdown._wsgi import DEFAULT_THREADS, WSGIMiddleware, WSGIServer

__all__ = [
    "ASGIWorker",
    "WSGIWorker",
    "budget_from_env",
    "graceful_timeout_for",
    "on_exit",
    "on_starting",
    "worker_controller",
]

logger = logging.getLogger("buttress.shutdown")

CONFIG_MODULE = "python:buttress.shutdown.gunicorn_conf"

# Set in the master by on_starting; the workers inherit it at fork.
_master: dict[str, Any] = {"budget": None, "results": None}
_controller: dict[int, GracefulShutdown] = {}


def budget_from_env(environ: Mapping[str, str] | None = None) -> ShutdownBudget:
    """The budget gunicorn's workers use: :meth:`ShutdownBudget.from_env`.

    ``BUTTRESS_GRACE_PERIOD``, ``BUTTRESS_PRE_STOP``, ``BUTTRESS_DRAIN_DELAY``
    and ``BUTTRESS_DRAIN_TIMEOUT`` (gunicorn has no flags of ours to carry them).
    """
    return ShutdownBudget.from_env(environ)


def graceful_timeout_for(budget: ShutdownBudget) -> int:
    """gunicorn's ``graceful_timeout`` for ``budget``: everything after SIGTERM, margin included."""
    return math.ceil(budget.drain_delay + budget.drain_timeout + budget.cleanup + budget.margin)


def worker_controller() -> GracefulShutdown:
    """This worker process's controller: register cleanup hooks on it.

    Call it in the worker (at application import without ``--preload``, or
    from a ``post_worker_init`` hook); each process gets its own.
    """
    pid = os.getpid()
    controller = _controller.get(pid)
    if controller is None:
        budget = _master["budget"] or budget_from_env()
        controller = _controller[pid] = GracefulShutdown(budget)
    return controller


# -- the master's hooks (gunicorn_conf exports them) -----------------------------


def on_starting(server: Any) -> None:
    """Check the settings against the budget, before any socket is bound or worker forked."""
    cfg = server.cfg
    worker_class = cfg.worker_class
    if not (isinstance(worker_class, type) and issubclass(worker_class, _BaseWorker)):
        raise ServerConfigError(
            f"worker_class {cfg.worker_class_str!r} does not run the buttress lifecycle: use "
            "buttress.shutdown.gunicorn.WSGIWorker (WSGI) or "
            "buttress.shutdown.gunicorn.ASGIWorker (ASGI) with this config module")
    try:
        budget = budget_from_env()
    except ValueError as exc:
        raise ServerConfigError(f"shutdown budget: {exc}") from None
    needed = budget.drain_delay + budget.drain_timeout + budget.cleanup
    graceful = float(cfg.graceful_timeout)
    if graceful < needed:
        raise ServerConfigError(
            f"graceful_timeout={cfg.graceful_timeout:g} is shorter than the shutdown budget "
            f"needs: drain_delay {budget.drain_delay:g} + drain_timeout "
            f"{budget.drain_timeout:g} + cleanup {budget.cleanup:g} = {needed:g}s, and gunicorn "
            f"would SIGKILL the workers mid-drain; leave graceful_timeout to "
            f"{CONFIG_MODULE} (it derives {graceful_timeout_for(budget)}) or raise it")
    if os.environ.get("BUTTRESS_GRACE_PERIOD"):
        left = budget.grace_period - budget.pre_stop
        if graceful > left + 1e-9:
            raise ServerConfigError(
                f"graceful_timeout={cfg.graceful_timeout:g} is longer than the "
                f"{left:g}s the grace period leaves after the preStop hook "
                f"(BUTTRESS_GRACE_PERIOD={os.environ['BUTTRESS_GRACE_PERIOD']}): the kubelet "
                "would SIGKILL gunicorn before it does; lower graceful_timeout or leave it "
                f"to {CONFIG_MODULE}")
    for address in cfg.address:
        if isinstance(address, tuple):
            _check_port_free(address)
    _master["budget"] = budget
    _master["results"] = tempfile.mkdtemp(prefix="buttress-gunicorn-")
    logger.info("buttress lifecycle in every worker: %s, graceful_timeout %gs", budget, graceful)


def on_exit(server: Any) -> None:
    """Exit with the worst code the workers reported (gunicorn itself would exit 0)."""
    results = _master["results"]
    if results is None:
        return
    codes: list[int] = []
    aborted = 0
    for name in sorted(os.listdir(results)):
        try:
            with open(os.path.join(results, name)) as file:
                report = json.load(file)
        except (OSError, ValueError) as exc:
            logger.error("worker report %s unreadable: %r", name, exc)
            codes.append(int(ExitCode.SERVER_FAILED))
            continue
        codes.append(int(report["exit_code"]))
        aborted += int(report.get("requests_aborted") or 0)
    shutil.rmtree(results, ignore_errors=True)
    code = _worst(codes)
    logger.info("%d worker(s) reported exit codes %s, %d request(s) cut: exit code %d",
                len(codes), sorted(codes), aborted, code)
    print(f"buttress: {len(codes)} worker(s) drained, {aborted} request(s) cut, "
          f"exit code {code}", file=sys.stderr, flush=True)
    if code:
        raise SystemExit(code)


def _worst(codes: list[int]) -> int:
    for code in (ExitCode.FORCED, ExitCode.SERVER_FAILED, ExitCode.DRAIN_TIMED_OUT,
                 ExitCode.CLEANUP_FAILED):
        if code in codes:
            return int(code)
    return max(codes, default=0)


def _check_port_free(address: tuple[Any, ...]) -> None:
    host, port = address[0], int(address[1])
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ServerConfigError(
                    f"bind {host}:{port}: port {port} is already in use (another process is "
                    "listening there)") from exc
            raise


# -- the workers -------------------------------------------------------------------


class _BaseWorker(Worker):
    """One gunicorn worker: uvicorn on the inherited sockets, driven by a controller."""

    wsgi_app = True

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        # gunicorn calls this in the master after on_starting, before forking any worker.
        if _master["budget"] is None:
            raise ServerConfigError(
                f"worker_class {cfg.worker_class_str!r} needs the buttress controller: start "
                f"gunicorn with -c {CONFIG_MODULE} (or call "
                "buttress.shutdown.gunicorn.on_starting and on_exit from your own config's "
                "hooks of the same names)")

    def init_process(self) -> None:
        # Our log lines go where gunicorn's error log goes.
        buttress_log = logging.getLogger("buttress")
        if not buttress_log.handlers:
            buttress_log.handlers = list(self.log.error_log.handlers)
            buttress_log.setLevel(self.log.error_log.level)
            buttress_log.propagate = False
        super().init_process()

    def init_signals(self) -> None:
        # SIGTERM and SIGINT belong to the controller (installed by run() on this, the main
        # thread); SIGQUIT is gunicorn's quick shutdown.
        for signum in self.SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGQUIT, self._quick_exit)
        signal.signal(signal.SIGUSR1, self.handle_usr1)
        signal.siginterrupt(signal.SIGUSR1, False)

    def _quick_exit(self, signum: int, frame: Any) -> None:
        controller = worker_controller()
        logger.warning("SIGQUIT: quick shutdown, %d request(s) dropped", controller.in_flight)
        self._report(int(controller.forced_exit_code), controller)
        os._exit(controller.forced_exit_code)

    def run(self) -> None:
        controller = worker_controller()
        master = self.ppid
        # A preStop drain request reaching one worker drains them all: ask the master.
        controller.drain_requester = lambda: os.kill(master, signal.SIGTERM)

        async def notify() -> None:
            self.notify()  # the heartbeat gunicorn's master watches
            if os.getppid() != master:
                controller.begin_drain("gunicorn master went away")

        options: dict[str, Any] = {
            "timeout_keep_alive": max(int(self.cfg.keepalive), 1),
            "callback_notify": notify,
            "timeout_notify": max(self.timeout / 2, 0.5),
            "forwarded_allow_ips": self.cfg.forwarded_allow_ips,
        }
        sockets = [listener.sock for listener in self.sockets]
        server = self._server(controller, sockets, options)
        code = controller.run(server)
        self._report(code, controller)
        sys.exit(0)  # the code travels in the report (see the module docstring)

    def _server(self, controller: GracefulShutdown, sockets: list[socket.socket],
                options: dict[str, Any]) -> ASGIServer:
        threads = self.cfg.threads if self.cfg.threads > 1 else DEFAULT_THREADS
        return WSGIServer(WSGIMiddleware(self.wsgi, controller), sockets=sockets,
                          threads=threads, **options)

    def _report(self, code: int, controller: GracefulShutdown) -> None:
        results = _master["results"]
        if results is None:
            return
        stats = controller.stats()
        report = {"pid": os.getpid(), "exit_code": code,
                  "requests_aborted": stats["requests_aborted"],
                  "requests_total": stats["requests_total"]}
        path = os.path.join(results, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as file:
            json.dump(report, file)
        os.replace(path + ".tmp", path)


class WSGIWorker(_BaseWorker):
    """A WSGI application on uvicorn in each worker, on ``--threads`` threads (32 by default)."""


class ASGIWorker(_BaseWorker):
    """An ASGI application on uvicorn in each worker (lifespan events included)."""

    def _server(self, controller: GracefulShutdown, sockets: list[socket.socket],
                options: dict[str, Any]) -> ASGIServer:
        return ASGIServer(ASGIMiddleware(self.wsgi, controller), sockets=sockets,
                          controller=controller, **options)
