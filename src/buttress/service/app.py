"""One gateway instance assembled from its settings, and ``python -m buttress serve``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

from buttress.service.admission import Admission, ThreadedAdmission
from buttress.service.gateway import LATENCY_BUCKETS, Gateway
from buttress.service.maintenance import Maintenance, record_drain
from buttress.service.records import TaskRecords
from buttress.service.settings import ServiceSettings, add_arguments, settings_from

__all__ = ["Service", "add_cli", "run_cli"]

logger = logging.getLogger("buttress.service")


class Service:
    """Everything one gateway process runs: the app, its admission, metrics, maintenance.

    ``Service(settings).app`` is the ASGI app (wrap it with the shutdown
    middleware, as :func:`run_cli` does through :func:`buttress.serve_asgi`);
    :meth:`start` starts the maintenance loop, :meth:`close` stops everything.
    """

    def __init__(self, settings: ServiceSettings, *, controller: Any = None,
                 registry: Any = None) -> None:
        import redis
        from prometheus_client import CollectorRegistry, Histogram

        from buttress.dedupe import RedisStore, SQLiteStore
        from buttress.distributed import FairQueue
        from buttress.metrics import register
        from buttress.service import observe

        self.settings = settings
        timeout = settings.redis_timeout
        # No client-side resends: a command that timed out may still run, and the HTTP
        # client's retry (after 503 + Retry-After) is the one that is safe (same id).
        self.client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            max_connections=settings.admission_threads + 8, client_name="buttress-gateway")
        self.queue = FairQueue(self.client, settings.queue, high_water=settings.high_water,
                               low_water=settings.low_water or None)
        if settings.dedupe_sqlite:
            self.store: Any = SQLiteStore(settings.dedupe_sqlite, sweep_every=None)
        else:
            self.store = RedisStore(self.client, namespace=f"buttress:svc:{settings.queue}:admit")
        records = TaskRecords(self.client, settings.queue,
                              ttl_ms=round(settings.dedupe_ttl * 1000))
        self.core = Admission(self.queue, self.store, records, ttl=settings.dedupe_ttl,
                              lease=settings.admission_lease, retry_after=settings.retry_after)
        self.admission = ThreadedAdmission(self.core, committers=settings.admission_threads,
                                           max_pending=settings.max_pending,
                                           retry_after=settings.retry_after)
        self.registry = registry if registry is not None else CollectorRegistry()
        latency = Histogram("buttress_gateway_request_duration_seconds",
                            "Time to answer a task request", buckets=LATENCY_BUCKETS,
                            registry=self.registry)
        self.gateway = Gateway(self.admission, max_body_bytes=settings.max_body_bytes,
                               max_tenant_bytes=settings.max_tenant_bytes,
                               tasks=frozenset(settings.tasks) or None,
                               metrics=self.render_metrics, latency=latency,
                               name=settings.queue)
        self.maintenance = Maintenance(self.client, self.queue,
                                       instance_id=settings.resolved_instance_id(),
                                       ttl_ms=settings.leader_ttl_ms,
                                       interval=settings.maintenance_interval,
                                       dedupe_store=self.store)
        self.controller = controller
        observe.install()
        register(self.gateway, self.registry, name=settings.queue)
        register(self.core.dedupe, self.registry, name="admission")
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

    def close(self) -> None:
        """Stop maintenance (stepping down), record how the drain went, close the pools."""
        self.maintenance.stop()
        if self.controller is not None:
            stats = self.controller.stats()
            outcome = "timed_out" if stats["requests_aborted"] else "clean"
            try:
                record_drain(self.client, self.settings.queue, outcome)
            except Exception as exc:
                logger.warning("could not record the drain outcome: %r", exc)
        self.admission.close()
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
    code = serve_asgi(service.app, host=settings.host, port=settings.port,
                      controller=controller, metrics_registry=service.registry)
    sys.stdout.flush()
    return code
