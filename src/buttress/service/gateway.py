"""The ingest gateway: an ASGI app taking tasks over HTTP (no web framework).

Routes (probes ``/livez``, ``/readyz``, ``/drainz`` are answered by the
shutdown middleware around this app, see :func:`buttress.serve_asgi`):

``POST /v1/tasks``
    JSON ``{"id", "tenant", "task", "priority", "payload"}`` (``priority``
    optional, default 0).  202 admitted; 200 a duplicate (the first outcome);
    409 the id was first sent with other content; 429 shedding or overloaded
    and 503 store unavailable, both with ``Retry-After``; 400 / 413 / 415 bad
    input, with a JSON error naming what was wrong, and nothing enqueued.
``GET /v1/tasks/{id}`` (and ``HEAD``)
    The task's record: state (queued, running, done, failed) and times.  The
    id is the path segment percent-decoded once, as UTF-8.
``GET /metrics``
    Prometheus text format.

Validation happens on the event loop before any Redis call; admission (dedupe,
enqueue) goes through one :class:`~buttress.service.admission.AdmissionPort`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import unicodedata
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from buttress.dedupe.core import MAX_ID_BYTES, fingerprint
from buttress.errors import ButtressError
from buttress.service.admission import AdmissionPort, Outcome, TaskRequest
from buttress.shutdown import lifespan

__all__ = ["MAX_PRIORITY", "BadRequest", "Gateway", "parse_task"]

logger = logging.getLogger("buttress.service")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_PRIORITY = 2**53  # the queue orders by a double: larger integers lose their order
MAX_TASK_NAME_BYTES = 200
_FIELDS = ("id", "tenant", "task", "priority", "payload")
_JSON = (b"content-type", b"application/json")
_CLOSE = (b"connection", b"close")
_TASK_PREFIX = "/v1/tasks/"
# Latency buckets (seconds) for the request histogram: 0.5 ms .. 10 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


class BadRequest(ButtressError):
    """A request refused before admission: status 400/404/405/408/413/415 and a JSON error.

    ``headers`` go into the answer as they are (``Allow`` of a 405, ``Connection:
    close`` of a 408 whose body was never read to its end).
    """

    def __init__(self, status: int, error: str, detail: str, field: str | None = None, *,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(detail)
        self.status = status
        self.body: dict[str, Any] = {"error": error, "detail": detail}
        if field is not None:
            self.body["field"] = field
        self.headers = headers


def parse_task(body: bytes, *, max_tenant_bytes: int,
               tasks: frozenset[str] | None = None) -> TaskRequest:
    """Decode and check a ``POST /v1/tasks`` body; BadRequest says exactly what is wrong."""
    try:
        document = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, NaN
        raise BadRequest(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest(400, "invalid_field",
                         f"the body must be a JSON object, got {type(document).__name__}")
    unknown = sorted(set(document) - set(_FIELDS))
    if unknown:
        raise BadRequest(400, "unknown_field", f"unknown field(s) {unknown}; a task has "
                         f"{list(_FIELDS)}", unknown[0])
    for name in ("id", "tenant", "task", "payload"):
        if name not in document:
            raise BadRequest(400, "missing_field", f"{name!r} is required", name)
    task_id = _text_field(document, "id", MAX_ID_BYTES)
    tenant = _text_field(document, "tenant", max_tenant_bytes)
    if not tenant.isprintable() and any(unicodedata.category(ch) == "Cc" for ch in tenant):
        # Cc: C0 (U+0000-001F), DEL and the C1 controls (U+007F-009F), NEL included.
        raise BadRequest(400, "invalid_field", "'tenant' must not contain control characters",
                         "tenant")
    task = _text_field(document, "task", MAX_TASK_NAME_BYTES)
    if tasks is not None and task not in tasks:
        raise BadRequest(400, "unknown_task", f"no worker handles task {task!r}; known: "
                         f"{sorted(tasks)}", "task")
    priority = document.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise BadRequest(400, "invalid_field", f"'priority' must be an integer, got "
                         f"{type(priority).__name__}", "priority")
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise BadRequest(400, "invalid_field", f"'priority' must be within +-2**53, got "
                         f"{priority}", "priority")
    payload = document["payload"]
    try:
        # What admission does with it: a payload with no canonical JSON (a lone surrogate
        # such as "\ud800", a number beyond a double such as 1e400) is refused here, not
        # discovered by the dedupe claim of the batch it would share with other requests.
        fingerprint(payload)
    except TypeError as exc:  # its message says why ("payload cannot be serialised ...")
        raise BadRequest(400, "invalid_field", str(exc)[:500], "payload") from None
    return TaskRequest(task_id, tenant, task, priority, payload)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _text_field(document: dict[str, Any], name: str, max_bytes: int) -> str:
    value = document[name]
    if not isinstance(value, str):
        raise BadRequest(400, "invalid_field", f"{name!r} must be a string, got "
                         f"{type(value).__name__}", name)
    if not value:
        raise BadRequest(400, "invalid_field", f"{name!r} must not be empty", name)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest(400, "invalid_field", f"{name!r} is not valid UTF-8 text",
                         name) from None
    if size > max_bytes:
        raise BadRequest(400, "too_long", f"{name!r} must be at most {max_bytes} bytes of "
                         f"UTF-8, got {size}", name)
    return value


class Gateway:
    """The ASGI app.  ``admission`` does the work; ``metrics`` renders /metrics (or None).

    At the server's lifespan shutdown it awaits ``shutdown`` (default:
    ``admission.aclose``) on the event loop that served the requests.

    ``stats()`` counts answers by status code and outcome: the source of
    ``buttress_gateway_requests_total``.
    """

    def __init__(self, admission: AdmissionPort, *, max_body_bytes: int,
                 max_tenant_bytes: int, tasks: frozenset[str] | None = None,
                 metrics: Callable[[], tuple[bytes, str]] | None = None,
                 latency: Any = None, name: str = "gateway",
                 shutdown: Callable[[], Awaitable[None]] | None = None,
                 body_timeout: float = 10.0) -> None:
        self.admission = admission
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.max_tenant_bytes = max_tenant_bytes
        self.tasks = tasks
        self.name = name
        self._metrics = metrics
        self._latency = latency  # a prometheus_client Histogram, or None
        self._shutdown = shutdown if shutdown is not None else admission.aclose
        self._answers: Counter[tuple[int, str]] = Counter()  # touched on the event loop only

    def stats(self) -> dict[str, Any]:
        return {"answers": {f"{code} {outcome}": n
                            for (code, outcome), n in sorted(self._answers.items())},
                "pending_admissions": self.admission.pending(),
                "admission": self.admission.stats()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send, shutdown=self._shutdown)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        path, method = scope["path"], scope["method"]
        headers = [_JSON]
        try:
            if path == "/v1/tasks":
                if method != "POST":
                    raise _not_allowed("POST", "use POST /v1/tasks")
                outcome = await self._post(scope, receive)
            elif path.startswith(_TASK_PREFIX):
                if method not in ("GET", "HEAD"):
                    raise _not_allowed("GET, HEAD", "use GET /v1/tasks/{id}")
                task_id = _path_id(scope)
                if not task_id or len(task_id.encode("utf-8", "replace")) > MAX_ID_BYTES:
                    raise BadRequest(400, "invalid_field", "the id in the path must be 1 to "
                                     f"{MAX_ID_BYTES} bytes", "id")
                outcome = await self.admission.status(task_id)
            elif path == "/metrics" and self._metrics is not None:
                body, content_type = self._metrics()
                await _respond(send, 200, body, content_type.encode())
                return
            else:
                raise BadRequest(404, "not_found", f"no route {path!r}; POST /v1/tasks or "
                                 "GET /v1/tasks/{id}")
        except BadRequest as exc:
            outcome = Outcome(exc.status, exc.body, exc.body["error"])
            headers.extend(exc.headers)
        except Exception:
            logger.exception("gateway: %s %s failed", method, path)
            outcome = Outcome(500, {"error": "internal", "detail": "see the gateway's log"},
                              "internal")
        self._answers[outcome.status, outcome.outcome] += 1
        if outcome.retry_after is not None:
            headers.append((b"retry-after", b"%d" % outcome.retry_after))
        await _respond(send, outcome.status, json.dumps(outcome.body).encode(), None, headers)
        if self._latency is not None:
            self._latency.observe(time.perf_counter() - started)

    async def _post(self, scope: Scope, receive: Receive) -> Outcome:
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            raise BadRequest(415, "unsupported_media_type",
                             f"Content-Type must be application/json, got "
                             f"{content_type.decode('latin-1')!r}")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BadRequest(413, "body_too_large", f"the body is {int(declared)} bytes; at most "
                             f"{self.max_body_bytes} are accepted")
        body = await _read_body(receive, self.max_body_bytes, self.body_timeout)
        request = parse_task(body, max_tenant_bytes=self.max_tenant_bytes, tasks=self.tasks)
        return await self.admission.admit(request)


def _not_allowed(allow: str, detail: str) -> BadRequest:
    return BadRequest(405, "method_not_allowed", detail, headers=((b"allow", allow.encode()),))


def _path_id(scope: Scope) -> str:
    """The task id of ``/v1/tasks/{id}``: the path segment, percent-decoded once.

    The server has decoded ``scope["path"]`` already, replacing bytes that are
    not UTF-8 with U+FFFD; decoding it again would turn the id ``a%41`` (sent
    as ``a%2541``) into ``aA``, another task.  The raw path, when the server
    gives it, is checked to decode as UTF-8: if not, the path names no task (400)
    rather than the task whose id holds U+FFFD.
    """
    raw = scope.get("raw_path")
    if raw is not None:
        try:
            urllib.parse.unquote_to_bytes(bytes(raw).partition(b"?")[0]).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(400, "invalid_field", "the id in the path is not UTF-8 once "
                             "percent-decoded", "id") from None
    return str(scope["path"][len(_TASK_PREFIX):])


async def _read_body(receive: Receive, limit: int, timeout: float) -> bytes:
    """The request body, within ``limit`` bytes and ``timeout`` seconds in all.

    The deadline covers the whole body, not each read: a client that sends a
    byte now and then, or fewer bytes than its Content-Length and then nothing,
    would otherwise hold the request (and every drain of this gateway) forever.
    A timer cancels this task at the deadline (``asyncio.wait_for`` per read
    would cost a task per request); its cancellation becomes a 408.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = loop.call_later(timeout, expire)
    try:
        return await _receive_body(receive, limit)
    except asyncio.CancelledError:
        if not expired:
            raise  # the drain deadline's cancellation: the middleware answers it
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+
        if uncancel is not None:
            uncancel()
        raise BadRequest(408, "body_timeout", f"the body did not arrive within {timeout} "
                         "seconds", headers=(_CLOSE,)) from None
    finally:
        timer.cancel()


async def _receive_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest(400, "incomplete", "the client went away before the body ended")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, "body_too_large", f"the body is over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, content_type: bytes | None,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = headers if headers is not None else [(b"content-type", content_type or b"")]
    headers.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
