"""Graceful shutdown for HTTP services: WSGI and ASGI, Kubernetes-ready.

When a service is told to stop, no request it accepted fails, the load
balancer learns before the listener closes, and the process exits inside its
grace period.  One controller, :class:`GracefulShutdown`, runs the lifecycle
STARTING -> READY -> DRAINING -> STOPPED for two server flavors:

* WSGI on the standard library's ``ThreadingHTTPServer`` (HTTP/1.1
  keep-alive, no dependency): :func:`serve_wsgi`, :class:`WSGIServer`,
  :class:`WSGIMiddleware`;
* ASGI under uvicorn, driven programmatically (the ``http`` extra):
  :func:`serve_asgi`, :class:`ASGIServer`, :class:`ASGIMiddleware`.

A complete service::

    budget = ShutdownBudget.from_env()        # BUTTRESS_GRACE_PERIOD, BUTTRESS_PRE_STOP
    controller = GracefulShutdown(budget)
    controller.add_cleanup(redis_client.close)
    sys.exit(serve_wsgi(app, port=8080, controller=controller))

See docs/shutdown.md for the sequence and deploy/kubernetes/ for manifests.
"""

from buttress.shutdown._asgi import ASGIMiddleware, ASGIServer, serve_asgi
from buttress.shutdown._lifecycle import (
    GRACE_PERIOD_ENV,
    PRE_STOP_ENV,
    ExitCode,
    GracefulShutdown,
    PortInUseError,
    ProbePaths,
    ShutdownBudget,
    State,
)
from buttress.shutdown._wsgi import WSGIMiddleware, WSGIServer, serve_wsgi

__all__ = [
    "GRACE_PERIOD_ENV",
    "PRE_STOP_ENV",
    "ASGIMiddleware",
    "ASGIServer",
    "ExitCode",
    "GracefulShutdown",
    "PortInUseError",
    "ProbePaths",
    "ShutdownBudget",
    "State",
    "WSGIMiddleware",
    "WSGIServer",
    "serve_asgi",
    "serve_wsgi",
]
