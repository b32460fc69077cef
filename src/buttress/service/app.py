"""One gateway instance assembled from its settings, and ``python -m buttress serve``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

from buttress.service.admission import (
    STATUS_READS,
    Admission,
    AdmissionCore,
    AsyncAdmission,
    ThreadedAdmission,
    async_client,
)
from buttress.service.gateway import LATENCY_BUCKETS, Gateway
from buttress.service.maintenance import Maintenance, record_drain
from buttress.service.records import AsyncTaskRecords, TaskRecords
from buttress.service.settings import ServiceSettings, add_arguments, settings_from

__all__ = ["Service", "add_cli", "run_cli"]

logger = logging.getLogger("buttress.service")


class Service:
    """Everything one gateway process runs: the app, its admission, metrics, maintenance.

    ``Service(settings).app`` is the ASGI app (wrap it with the shutdown
    middleware, as :func:`run_cli` does through :func:`buttress.serve_asgi`);
    :meth:`start` starts the maintenance loop; :meth:`aclose` (on the loop that
    served the app: the lifespan shutdown calls it) lets the admissions in flight
    finish and closes what lives on that loop, then :meth:`close` stops the rest.
    ``settings.admission`` picks :class:`ThreadedAdmission` (default) or
    :class:`AsyncAdmission`.
    """

    def __init__(self, settings: ServiceSettings, *, controller: Any = None,
                 registry: Any = None) -> None:
        import redis
        import redis.asyncio
        from prometheus_client import CollectorRegistry, Histogram

        from buttress.dedupe import AsyncRedisStore, AsyncSQLiteStore, RedisStore, SQLiteStore
        from buttress.distributed import AsyncFairQueue, FairQueue
        from buttress.metrics import register
        from buttress.service import observe

        self.settings = settings
        timeout = settings.redis_timeout
        # No client-side resends: a command that timed out may still run, and the HTTP
        # client's retry (after 503 + Retry-After) is the one that is safe (same id).
        options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                                   "client_name": "buttress-gateway"}
        threads = settings.admission == "threads"
        # redis-py for the maintenance thread (and threaded admission); redis.asyncio for
        # admission on the server's event loop.
        self.client = redis.Redis.from_url(
            settings.redis_url, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            max_connections=settings.admission_batches + 8 if threads else 8, **options)
        # An enqueue's request id is derived from the task id (admission.enqueue_request_id):
        # the queue may recognise a retry only while the dedupe store remembers the id,
        # or an id sent again after its dedupe record expired would be merged into the
        # first task instead of queued anew.
        queue_options = {"high_water": settings.high_water,
                         "low_water": settings.low_water or None,
                         "resend_window_ms": min(600_000, max(1, round(settings.dedupe_ttl
                                                                       * 1000)))}
        self.queue = FairQueue(self.client, settings.queue, **queue_options)
        self.store: Any = None  # Redis expires its own claims: nothing for maintenance
        if settings.dedupe_sqlite:
            self.store = SQLiteStore(settings.dedupe_sqlite, sweep_every=None)
        namespace = f"buttress:svc:{settings.queue}:admit"
        ttl_ms = round(settings.dedupe_ttl * 1000)
        grouping = {"committers": settings.admission_batches,
                    "max_pending": settings.max_pending}
        self.async_client: Any = None
        if threads:
            core = AdmissionCore(retry_after=settings.retry_after)
            steps = Admission(core, self.queue, self.store or RedisStore(self.client,
                                                                         namespace=namespace),
                              TaskRecords(self.client, settings.queue, ttl_ms=ttl_ms),
                              ttl=settings.dedupe_ttl, lease=settings.admission_lease)
            self.admission: Any = ThreadedAdmission(steps, **grouping)
        else:
            # Bounded like the threads' pool: a batch uses one connection at a time, the
            # status reads STATUS_READS, and 8 are slack.
            self.async_client = async_client(
                settings.redis_url, max_connections=settings.admission_batches
                + STATUS_READS + 8,
                retry=redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0), **options)
            store = (AsyncSQLiteStore(store=self.store) if self.store is not None
                     else AsyncRedisStore(self.async_client, namespace=namespace))
            self.admission = AsyncAdmission(
                AsyncFairQueue(self.async_client, settings.queue, **queue_options), store,
                AsyncTaskRecords(self.async_client, settings.queue, ttl_ms=ttl_ms),
                ttl=settings.dedupe_ttl, lease=settings.admission_lease,
                retry_after=settings.retry_after, **grouping)
        self._closed_on_loop = False
        self.registry = registry if registry is not None else CollectorRegistry()
        latency = Histogram("buttress_gateway_request_duration_seconds",
                            "Time to answer a task request", buckets=LATENCY_BUCKETS,
                            registry=self.registry)
        self.gateway = Gateway(self.admission, max_body_bytes=settings.max_body_bytes,
                               max_tenant_bytes=settings.max_tenant_bytes,
                               tasks=frozenset(settings.tasks) or None,
                               metrics=self.render_metrics, latency=latency,
                               name=settings.queue, shutdown=self.aclose,
                               body_timeout=settings.body_timeout)
        self.maintenance = Maintenance(self.client, self.queue,
                                       instance_id=settings.resolved_instance_id(),
                                       ttl_ms=settings.leader_ttl_ms,
                                       interval=settings.maintenance_interval,
                                       dedupe_store=self.store)
        self.controller = controller
        observe.install()
        register(self.gateway, self.registry, name=settings.queue)
        register(self.admission.dedupe, self.registry, name="admission")
        register(self.maintenance, self.registry, name=settings.queue)
        register(self.maintenance.elector, self.registry)
        if controller is not None:
            register(controller, self.registry, name="gateway")

    @property
    def app(self) -> Gateway:
        return self.gateway

    def render_metrics(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def start(self) -> Service:
        self.maintenance.start()
        return self

    async def aclose(self) -> None:
        """On the server's event loop (lifespan shutdown): finish the admissions in flight,
        close the asyncio Redis client.  Call it yourself if you serve ``app`` without
        lifespan events."""
        if self._closed_on_loop:
            return
        self._closed_on_loop = True
        await self.admission.aclose()
        if self.async_client is not None:
            await self.async_client.aclose()

    def close(self) -> None:
        """Stop maintenance (stepping down), record how the drain went, close the clients."""
        self.maintenance.stop()
        if self.controller is not None:
            stats = self.controller.stats()
            outcome = "timed_out" if stats["requests_aborted"] else "clean"
            try:
                record_drain(self.client, self.settings.queue, outcome)
            except Exception as exc:
                logger.warning("could not record the drain outcome: %r", exc)
        if isinstance(self.admission, ThreadedAdmission):
            self.admission.close()  # served without lifespan events: its threads end here
        if self.store is not None:
            self.store.close()
        logger.info("gateway stopped: %s", json.dumps(self.gateway.stats()))
        self.client.close()


def add_cli(commands: Any) -> None:
    """Add ``serve`` to ``python -m buttress`` (called from buttress.__main__)."""
    parser = commands.add_parser(
        "serve", help="run the ingest gateway (HTTP -> dedupe -> fair queue)",
        description="Take tasks over HTTP (POST /v1/tasks), drop duplicates, queue them "
        "fairly per tenant in Redis for `python -m buttress worker`; drains on SIGTERM. "
        "Every setting also reads an environment variable (shown in brackets).")
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.set_defaults(run=run_cli, command_parser=parser)


def run_cli(parser: argparse.ArgumentParser, args: argparse.Namespace,
            environ: Mapping[str, str] | None = None) -> int:
    """Validate the settings (errors name the setting), then serve until SIGTERM."""
    from buttress.errors import PortInUseError
    from buttress.shutdown import GracefulShutdown, ShutdownBudget, serve_asgi

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    given = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
    try:
        settings = settings_from(given, environ)
        controller = GracefulShutdown(ShutdownBudget.from_env(environ))
        service = Service(settings, controller=controller)
    except (TypeError, ValueError) as exc:
        parser.error(f"serve: {exc}")
    controller.add_cleanup(service.close, name="gateway")
    service.start()
    # The shutdown middleware answers /metrics itself, outside the in-flight count,
    # so a scrape never holds or extends the drain.
    try:
        code = serve_asgi(service.app, host=settings.host, port=settings.port,
                          controller=controller, metrics_registry=service.registry)
    except PortInUseError as exc:
        # Nothing was served, so no drain to record: step down from the maintenance
        # election (it may have won already) and say which port, as for a bad setting.
        service.maintenance.stop()
        service.client.close()
        parser.error(f"serve: {exc}")
    sys.stdout.flush()
    return code
