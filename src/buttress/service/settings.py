"""Settings of the gateway, from command-line flags and environment variables.

Each setting has a flag (``--max-body-bytes``) and an environment variable
(``BUTTRESS_MAX_BODY_BYTES``); a flag wins over the variable, the variable over
the default.  Everything is checked once, at start, and a bad value is a
ValueError that names the flag and the variable, before anything listens.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from buttress._validate import (
    parse_int_setting,
    parse_number_setting,
    require_choice,
    require_str,
)
from buttress.dedupe.core import MAX_TTL

__all__ = ["MAX_DEDUPE_TTL", "SETTINGS", "ServiceSettings", "add_arguments", "settings_from"]

# The Deduplicator's own bound (ten years): a larger --dedupe-ttl used to start the
# gateway and then fail every admission with a 500.
MAX_DEDUPE_TTL = MAX_TTL


@dataclass(frozen=True)
class ServiceSettings:
    """Everything ``python -m buttress serve`` needs (see docs/service.md for each)."""

    redis_url: str
    queue: str = "tasks"
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = 1_048_576
    max_tenant_bytes: int = 128
    tasks: tuple[str, ...] = ()  # known task names; empty: any name is accepted
    high_water: int = 10_000
    low_water: int = 0  # 0: high_water // 2
    dedupe_ttl: float = 86_400.0
    admission_lease: float = 5.0
    admission: str = "threads"  # threads: sync components on a thread; async: on the loop
    admission_batches: int = 1
    max_pending: int = 512
    body_timeout: float = 10.0
    redis_timeout: float = 2.0
    retry_after: int = 1
    leader_ttl_ms: int = 15_000
    maintenance_interval: float = 5.0
    instance_id: str = ""
    dedupe_sqlite: str = ""  # a path: dedupe claims in SQLite (one machine) instead of Redis

    def resolved_instance_id(self) -> str:
        return self.instance_id or f"{socket.gethostname()}:{os.getpid()}"


# name -> (flag, env var, parser of the text, help)
Parser = Callable[[str, str], Any]


def _int(minimum: int, maximum: int | None = None) -> Parser:
    return lambda setting, text: parse_int_setting(setting, text, minimum=minimum,
                                                   maximum=maximum)


def _seconds(minimum: float, maximum: float | None = None) -> Parser:
    return lambda setting, text: parse_number_setting(setting, text, minimum=minimum,
                                                      maximum=maximum)


def _text(max_bytes: int, forbidden: str = "") -> Parser:
    return lambda setting, text: require_str(setting, text.strip(), max_bytes=max_bytes,
                                             forbidden=forbidden)


def _choice(*choices: str) -> Parser:
    return lambda setting, text: require_choice(setting, text.strip(), choices)


def _optional_text(setting: str, text: str) -> str:
    return require_str(setting, text.strip(), allow_empty=True, max_bytes=4096)


def _url(setting: str, text: str) -> str:
    text = require_str(setting, text.strip(), max_bytes=4096)
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{setting} must be a redis://, rediss:// or unix:// URL, got {text!r}")
    return text


def _names(setting: str, text: str) -> tuple[str, ...]:
    names = tuple(sorted({part.strip() for part in text.split(",") if part.strip()}))
    for name in names:
        require_str(f"{setting} (task name {name!r})", name, max_bytes=200)
    return names


SETTINGS: dict[str, tuple[str, str, Parser, str]] = {
    "redis_url": ("--redis", "BUTTRESS_REDIS_URL", _url, "redis://host:port/db (required)"),
    "queue": ("--queue", "BUTTRESS_QUEUE", _text(200, "{}"), "FairQueue name (default tasks)"),
    "host": ("--host", "BUTTRESS_HOST", _text(255), "listen address (default 0.0.0.0)"),
    "port": ("--port", "BUTTRESS_PORT", _int(0, 65535), "listen port (default 8080)"),
    "max_body_bytes": ("--max-body-bytes", "BUTTRESS_MAX_BODY_BYTES", _int(64, 64 << 20),
                       "largest request body accepted; more is 413 (default 1 MiB)"),
    "max_tenant_bytes": ("--max-tenant-bytes", "BUTTRESS_MAX_TENANT_BYTES", _int(1, 4096),
                         "longest tenant name in UTF-8 bytes (default 128)"),
    "tasks": ("--tasks", "BUTTRESS_TASKS", _names,
              "comma-separated task names the workers handle; others are 400 (default: any)"),
    "high_water": ("--high-water", "BUTTRESS_HIGH_WATER", _int(1),
                   "ready depth at which the queue sheds (default 10000)"),
    "low_water": ("--low-water", "BUTTRESS_LOW_WATER", _int(0),
                  "ready depth at which shedding ends (default high_water // 2)"),
    "dedupe_ttl": ("--dedupe-ttl", "BUTTRESS_DEDUPE_TTL", _seconds(1.0, MAX_DEDUPE_TTL),
                   "seconds an id is remembered (default 86400)"),
    "admission_lease": ("--admission-lease", "BUTTRESS_ADMISSION_LEASE", _seconds(0.1, 300),
                        "seconds a gateway holds an id while enqueuing it (default 5)"),
    "admission": ("--admission", "BUTTRESS_ADMISSION", _choice("threads", "async"),
                  "threads: dedupe and enqueue with the sync components on a thread, beside "
                  "the event loop (more throughput on 2+ cores); async: awaited on the event "
                  "loop (lower tail latency, one thread) (default threads)"),
    "admission_batches": ("--admission-batches", "BUTTRESS_ADMISSION_BATCHES", _int(1, 64),
                          "admission batches (group commits) in flight at once (default 1)"),
    "max_pending": ("--max-pending", "BUTTRESS_MAX_PENDING", _int(1),
                    "admissions waiting or in flight before the gateway answers 429 "
                    "(default 512)"),
    "body_timeout": ("--body-timeout", "BUTTRESS_BODY_TIMEOUT", _seconds(0.1, 300),
                     "seconds a client has to send a request body; past it, 408 (default 10)"),
    "redis_timeout": ("--redis-timeout", "BUTTRESS_REDIS_TIMEOUT", _seconds(0.05, 60),
                      "socket timeout of Redis calls; past it the answer is 503 (default 2)"),
    "retry_after": ("--retry-after", "BUTTRESS_RETRY_AFTER", _int(1, 3600),
                    "Retry-After seconds on 503 (default 1)"),
    "leader_ttl_ms": ("--leader-ttl-ms", "BUTTRESS_LEADER_TTL_MS", _int(100, 3_600_000),
                      "maintenance leader lease (default 15000)"),
    "maintenance_interval": ("--maintenance-interval", "BUTTRESS_MAINTENANCE_INTERVAL",
                             _seconds(0.05, 3600), "seconds between maintenance runs (default 5)"),
    "instance_id": ("--instance-id", "BUTTRESS_INSTANCE_ID", _optional_text,
                    "this instance in the election (default host:pid)"),
    "dedupe_sqlite": ("--dedupe-sqlite", "BUTTRESS_DEDUPE_SQLITE", _optional_text,
                      "keep dedupe claims in this SQLite file instead of Redis (one machine)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (all default to None: env, then the built-in default)."""
    defaults = {f.name: f.default for f in fields(ServiceSettings)}
    for name, (flag, env, _, text) in SETTINGS.items():
        default = defaults.get(name)
        shown = "" if name == "redis_url" else f" [env {env}; default {default!r}]"
        parser.add_argument(flag, dest=name, metavar="VALUE", default=None,
                            help=f"{text}{shown}")


def settings_from(args: argparse.Namespace | Mapping[str, str | None] | None = None,
                  environ: Mapping[str, str] | None = None) -> ServiceSettings:
    """Resolve every setting (flag, then env, then default); ValueError names the bad one."""
    env = os.environ if environ is None else environ
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    values: dict[str, Any] = {}
    for name, (flag, variable, parse, _) in SETTINGS.items():
        text, source = given.get(name), flag
        if text is None:
            text, source = env.get(variable), variable
        if text is not None:
            values[name] = parse(source, str(text))
    if "redis_url" not in values:
        raise ValueError("the Redis URL is required: pass --redis URL or set BUTTRESS_REDIS_URL")
    settings = ServiceSettings(**values)
    low = settings.low_water or settings.high_water // 2
    if low >= settings.high_water:
        raise ValueError(f"--low-water/BUTTRESS_LOW_WATER must be < high water "
                         f"{settings.high_water}, got {low}")
    return settings
