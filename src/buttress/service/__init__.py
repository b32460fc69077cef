"""The components working as one service: ``python -m buttress serve`` and its workers.

* :mod:`~buttress.service.gateway`: the ASGI ingest gateway (POST /v1/tasks);
* :mod:`~buttress.service.admission`: dedupe + enqueue, and the one seam between
  the async gateway and the sync components (:class:`ThreadedAdmission`);
* :mod:`~buttress.service.worker`: handlers that run each task effectively once;
* :mod:`~buttress.service.maintenance`: the leader-run maintenance loop;
* :mod:`~buttress.service.app`: assembly and the ``serve`` command.

docs/service.md describes the request flow, the status codes and the runbook.
"""

from buttress.service.admission import (
    Admission,
    AdmissionPort,
    Outcome,
    TaskRequest,
    ThreadedAdmission,
)
from buttress.service.app import Service, add_cli, run_cli
from buttress.service.gateway import BadRequest, Gateway, parse_task
from buttress.service.maintenance import Maintenance
from buttress.service.settings import ServiceSettings, settings_from
from buttress.service.worker import ServiceHandlers

__all__ = [
    "Admission",
    "AdmissionPort",
    "BadRequest",
    "Gateway",
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
