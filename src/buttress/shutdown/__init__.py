"""Graceful shutdown for HTTP services: WSGI and ASGI, Kubernetes-ready.

When a service is told to stop, no request it accepted fails, the load
balancer learns before the listener closes, and the process exits inside its
grace period.  One controller, :class:`GracefulShutdown`, runs the lifecycle
STARTING -> READY -> DRAINING -> STOPPED for two server flavors:

* ASGI under uvicorn (h11), driven programmatically (the ``http`` extra):
  :func:`serve_asgi`, :class:`ASGIServer`, :class:`ASGIMiddleware`;
* WSGI on the same uvicorn path through the a2wsgi adapter and a bounded
  thread pool: :func:`serve_wsgi`, :class:`WSGIServer`,
  :class:`WSGIMiddleware` (tracking for any other WSGI server);
* gunicorn: ``gunicorn -c python:buttress.shutdown.gunicorn_conf app:app``
  (worker classes in :mod:`buttress.shutdown.gunicorn`).

``controller.draining`` (a :class:`DrainSignal`) lets streams end themselves;
``python -m buttress drain --port P`` is the preStop hook.

A complete service::

    budget = ShutdownBudget.from_env()        # BUTTRESS_GRACE_PERIOD, BUTTRESS_PRE_STOP
    controller = GracefulShutdown(budget)
    controller.add_cleanup(redis_client.close)
    sys.exit(serve_wsgi(app, port=8080, controller=controller))

See docs/shutdown.md for the sequence and deploy/kubernetes/ for manifests.
"""

from buttress.shutdown._asgi import ASGIMiddleware, ASGIServer, serve_asgi
from buttress.shutdown._lifecycle import (
    DRAIN_DELAY_ENV,
    DRAIN_TIMEOUT_ENV,
    GRACE_PERIOD_ENV,
    PRE_STOP_ENV,
    DrainSignal,
    ExitCode,
    GracefulShutdown,
    PortInUseError,
    ProbePaths,
    ShutdownBudget,
    State,
)
from buttress.shutdown._lifespan import lifespan
from buttress.shutdown._wsgi import WSGIGateway, WSGIMiddleware, WSGIServer, serve_wsgi

__all__ = [
    "DRAIN_DELAY_ENV",
    "DRAIN_TIMEOUT_ENV",
    "GRACE_PERIOD_ENV",
    "PRE_STOP_ENV",
    "ASGIMiddleware",
    "ASGIServer",
    "DrainSignal",
    "ExitCode",
    "GracefulShutdown",
    "PortInUseError",
    "ProbePaths",
    "ShutdownBudget",
    "State",
    "WSGIGateway",
    "WSGIMiddleware",
    "WSGIServer",
    "lifespan",
    "serve_asgi",
    "serve_wsgi",
]
