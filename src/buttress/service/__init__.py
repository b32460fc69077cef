"""The components working as one service: ``python -m buttress serve`` and its workers.

* :mod:`~buttress.service.gateway`: the ASGI ingest gateway (POST /v1/tasks);
* :mod:`~buttress.service.admission`: dedupe + enqueue, its decisions in
  :class:`AdmissionCore`, on the event loop (:class:`AsyncAdmission`, the
  default) or with the sync components on threads (:class:`ThreadedAdmission`);
* :mod:`~buttress.service.worker`: handlers that run each task effectively once
  (:class:`ServiceHandlers` for ``Worker``, :class:`AsyncServiceHandlers` for
  ``AsyncWorker``);
* :mod:`~buttress.service.maintenance`: the leader-run maintenance loop;
* :mod:`~buttress.service.app`: assembly and the ``serve`` command.

docs/service.md describes the request flow, the status codes and the runbook.
"""

from buttress.service.admission import (
    Admission,
    AdmissionCore,
    AdmissionPort,
    AsyncAdmission,
    GroupCommit,
    Outcome,
    TaskRequest,
    ThreadedAdmission,
)
from buttress.service.app import Service, add_cli, run_cli
from buttress.service.gateway import BadRequest, Gateway, parse_task
from buttress.service.maintenance import Maintenance
from buttress.service.settings import ServiceSettings, settings_from
from buttress.service.worker import AsyncServiceHandlers, ServiceHandlers

__all__ = [
    "Admission",
    "AdmissionCore",
    "AdmissionPort",
    "AsyncAdmission",
    "AsyncServiceHandlers",
    "BadRequest",
    "Gateway",
    "GroupCommit",
    "Maintenance",
    "Outcome",
    "Service",
    "ServiceHandlers",
    "ServiceSettings",
    "TaskRequest",
    "ThreadedAdmission",
    "add_cli",
    "parse_task",
    "run_cli",
    "settings_from",
]
