"""Metrics of the service's own objects (the gateway, the maintenance loop).

They join :mod:`buttress.metrics` as two more kinds, through its public
:func:`~buttress.metrics.add_kind`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from buttress.metrics import KINDS, _Families, _queue, add_kind, capped_tenants

__all__ = ["install"]


def _gateway(s: Mapping[str, Any], item: str, f: _Families) -> None:
    for answer, count in s["answers"].items():
        code, _, outcome = answer.partition(" ")
        f.counter("buttress_gateway_requests", "Task requests answered, by code and outcome",
                  count, item, code=code, outcome=outcome)
    f.gauge("buttress_gateway_pending_admissions", "Admissions waiting or being admitted",
            s["pending_admissions"], item)
    f.counter("buttress_gateway_admission_batches", "Admission batches (group commits) run",
              s["admission"]["batches"], item)


def _maintenance(s: Mapping[str, Any], item: str, f: _Families) -> None:
    f.gauge("buttress_maintenance_is_leader", "1 on the instance running maintenance",
            1.0 if s["is_leader"] else 0.0, item)
    f.counter("buttress_maintenance_runs", "Maintenance runs done by this instance", s["runs"],
              item)
    f.counter("buttress_maintenance_errors", "Maintenance runs that failed", s["errors"], item)
    f.gauge("buttress_maintenance_last_run_timestamp_seconds",
            "Unix time of this instance's last run (0: never)", s["last_run"], item)
    snapshot = s["snapshot"]
    if snapshot is None:
        return  # followers export no deployment-wide series: nothing is summed twice
    _queue(snapshot["queue"], item, f)
    ages = snapshot["head_age_by_tenant"]
    f.gauge("buttress_queue_oldest_head_age_seconds",
            "Age of the oldest task at the head of a tenant's queue", max(ages.values(),
                                                                          default=0.0), item)
    for tenant, age in capped_tenants(ages, f.max_tenants, combine=max):
        f.gauge("buttress_queue_head_age_seconds", "Age of the task at the head of each "
                "tenant's queue (capped; __other__ is the oldest of the rest)", age, item,
                tenant=tenant)
    for outcome in ("clean", "timed_out"):
        f.counter("buttress_gateway_drains", "Gateway drains in the deployment, by outcome",
                  snapshot["drains"].get(outcome, 0), item, outcome=outcome)


def install() -> None:
    """Teach :func:`buttress.metrics.register` the service's classes (idempotent)."""
    if "gateway" not in KINDS:
        add_kind("Gateway", "gateway", _gateway)
        add_kind("Maintenance", "maintenance", _maintenance, label="queue")
