"""gunicorn settings for the buttress lifecycle.

    gunicorn -c python:buttress.shutdown.gunicorn_conf app:app

The budget comes from the environment, as for ``serve_wsgi``:
``BUTTRESS_GRACE_PERIOD`` (mirror the pod's terminationGracePeriodSeconds),
``BUTTRESS_PRE_STOP``, and ``BUTTRESS_DRAIN_DELAY`` / ``BUTTRESS_DRAIN_TIMEOUT``
to set those parts.  ``graceful_timeout`` is derived from it; settings given
on the command line win over these, and ``on_starting`` refuses ones that do
not fit the budget (a clear ``Error:`` naming the setting, before anything is
served).  A config of your own can start with
``from buttress.shutdown.gunicorn_conf import *`` and call ``on_starting`` /
``on_exit`` from hooks of its own.
"""

from buttress.shutdown.gunicorn import (
    budget_from_env,
    graceful_timeout_for,
    on_exit,
    on_starting,
)

__all__ = ["graceful_timeout", "on_exit", "on_starting", "worker_class"]

# ASGI applications: -k buttress.shutdown.gunicorn.ASGIWorker
worker_class = "buttress.shutdown.gunicorn.WSGIWorker"
graceful_timeout = graceful_timeout_for(budget_from_env())
