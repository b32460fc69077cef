"""Work that must run once per deployment, done by whichever instance leads.

Every gateway runs a :class:`Maintenance`: a :class:`~buttress.LeaderElector`
contends for ``<queue>-maintenance`` and a thread runs :meth:`run_once` every
``interval`` seconds while this instance holds the term.  One run:

* reads the queue's stats (depth, dead letters, counters, per-tenant depth) and
  the age of the task at the head of each tenant's queue, kept as a snapshot
  that the leader's ``/metrics`` exports (followers export none, so a
  deployment-wide gauge is never summed twice);
* sweeps expired dedupe claims when the store is SQLite (Redis expires its own);
* reads the deployment's drain outcomes (written by each gateway as it exits);
* appends ``{instance, token, started, finished}`` to a capped run log in Redis,
  so an operator (and the end-to-end test) can check that runs of two terms
  never overlap.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from buttress.leader import LeaderElection, LeaderElector

__all__ = ["RUN_LOG_LENGTH", "Maintenance", "head_ages", "record_drain"]

logger = logging.getLogger("buttress.service")

RUN_LOG_LENGTH = 10_000


def service_key(queue_name: str, suffix: str) -> str:
    return f"buttress:svc:{queue_name}:{suffix}"


class Maintenance:
    """The leader-run maintenance loop of one gateway instance."""

    def __init__(self, client: Any, queue: Any, *, instance_id: str, ttl_ms: int,
                 interval: float, dedupe_store: Any = None, max_tenants: int = 20) -> None:
        self.client = client
        self.queue = queue
        self.interval = interval
        self.dedupe_store = dedupe_store
        self.max_tenants = max_tenants
        self.election = LeaderElection(client, f"{queue.name}-maintenance", ttl_ms=ttl_ms)
        self.elector = LeaderElector(self.election, instance_id)
        self.instance_id = instance_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="buttress-maintenance",
                                        daemon=True)
        self._counts = {"runs": 0, "errors": 0, "swept": 0, "abandoned": 0}
        self._last_run = 0.0
        self.snapshot: dict[str, Any] | None = None  # the last run's findings, leader only

    def start(self) -> Maintenance:
        self.elector.start()
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop running, then step down (the lease is released for the next leader)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.elector.stop(timeout)

    def stats(self) -> dict[str, Any]:
        leading = self.elector.is_leader()
        return {"instance_id": self.instance_id, "is_leader": leading,
                "last_run": self._last_run, **self._counts,
                "snapshot": self.snapshot if leading else None}

    def run_once(self) -> bool:
        """One maintenance run if this instance leads now; True if it ran."""
        token = self.elector.fencing_token
        if token is None or not self.elector.is_leader():
            self.snapshot = None
            return False
        started = time.time()  # after the check: [started, finished] lies inside the term
        queue_stats = self.queue.stats()
        ages = head_ages(self.client, self.queue, list(queue_stats["depth_by_tenant"]))
        drains = {_text(k): int(v) for k, v in
                  self.client.hgetall(service_key(self.queue.name, "drains")).items()}
        swept = 0
        if self.dedupe_store is not None and type(self.dedupe_store).__name__ == "SQLiteStore":
            swept = self.dedupe_store.sweep(budget=0.05)
        finished = time.time()
        if self.elector.fencing_token != token or not self.elector.is_leader():
            # The term ended while this run waited on Redis (a pause, a partition): its
            # findings are not published, so two terms' runs never overlap in the log.
            self._counts["abandoned"] += 1
            self.snapshot = None
            return False
        entry = json.dumps({"instance": self.instance_id, "token": token,
                            "started": started, "finished": finished})
        runs = service_key(self.queue.name, "maintenance:runs")
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(runs, entry)
        pipe.ltrim(runs, -RUN_LOG_LENGTH, -1)
        pipe.execute()
        self.snapshot = {"queue": queue_stats, "head_age_by_tenant": ages, "drains": drains}
        self._counts["runs"] += 1
        self._counts["swept"] += swept
        self._last_run = finished
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception as exc:  # Redis trouble: counted, logged, tried again next time
                self._counts["errors"] += 1
                self.snapshot = None
                logger.warning("maintenance run failed: %r", exc)


def head_ages(client: Any, queue: Any, tenants: list[str]) -> dict[str, float]:
    """Seconds since the task at the head of each tenant's ready queue was enqueued.

    Reads the FairQueue's own keys (``t:<tenant>`` and ``task:<id>``'s
    ``enqueued_at``, Redis server time in ms): the one place the service
    depends on the queue's key layout (tests/test_service.py checks it).
    """
    if not tenants:
        return {}
    pipe = client.pipeline(transaction=False)
    pipe.time()
    for tenant in tenants:
        pipe.zrange(queue.prefix + "t:" + tenant, 0, 0)
    replies = pipe.execute()
    seconds, micros = replies[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    heads = [(tenant, _text(ids[0])) for tenant, ids in zip(tenants, replies[1:], strict=True)
             if ids]
    pipe = client.pipeline(transaction=False)
    for _, task_id in heads:
        pipe.hget(queue.prefix + "task:" + task_id, "enqueued_at")
    ages: dict[str, float] = {}
    for (tenant, _), enqueued in zip(heads, pipe.execute(), strict=True):
        if enqueued is not None:
            ages[tenant] = max(0.0, (now_ms - int(enqueued)) / 1000.0)
    return ages


def record_drain(client: Any, queue_name: str, outcome: str) -> None:
    """Count one gateway drain (``clean`` or ``timed_out``) in the deployment's hash."""
    client.hincrby(service_key(queue_name, "drains"), outcome, 1)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
