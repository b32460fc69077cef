"""The asyncio twin of :mod:`buttress.leader`, over ``redis.asyncio``.

Same scripts, same keys, same decisions: each class here only runs the
Redis calls of its sync sibling's protocol base (:class:`ElectionProtocol`,
:class:`ElectorCore`, :class:`FencedResource`) with ``await``.  Sync and
async contenders of one election interoperate.

>>> election = AsyncLeaderElection(redis.asyncio.Redis(), "cron", ttl_ms=10_000)  # doctest: +SKIP
>>> elector = AsyncLeaderElector(election, "pod-7", on_elected=start)  # doctest: +SKIP
>>> elector.start()            # a task on the running loop          # doctest: +SKIP
>>> await elector.stop()                                              # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from buttress._redis import Script
from buttress._validate import require_number
from buttress.leader import (
    ElectionProtocol,
    ElectorCore,
    FencedResource,
    _mapped,
    _Sleep,
)

__all__ = ["AsyncFencedStore", "AsyncLeaderElection", "AsyncLeaderElector"]

logger = logging.getLogger("buttress.leader")


class AsyncLeaderElection(ElectionProtocol):
    """:class:`buttress.LeaderElection` for a ``redis.asyncio`` client (methods are coroutines).

    A sync client is a TypeError naming both (use :class:`buttress.LeaderElection`).
    """

    _ASYNC = True

    async def acquire_leader(self, instance_id: str) -> bool:
        """Start a new term for ``instance_id`` if no lease is held; True if won."""
        keys, args = self._acquire_request(instance_id)
        sent_at = time.monotonic()
        reply = await self._call("acquire", self.ACQUIRE, keys, args)
        return self._acquire_reply(instance_id, sent_at, reply)

    async def renew_leader(self, instance_id: str) -> bool:
        """Extend this instance's current term by ``ttl_ms``; False if it has ended."""
        term, keys, args = self._renew_request(instance_id)
        if term is None:
            return False
        sent_at = time.monotonic()
        reply = await self._call("renew", self.RENEW, keys, args)
        return self._renew_reply(term, sent_at, reply)

    async def release_leader(self, instance_id: str) -> bool:
        """End this instance's term and delete its lease; True if it was deleted."""
        term, keys, args = self._release_request(instance_id)
        if term is None:
            return False
        reply = await self._call("release", self.RELEASE, keys, args)
        return self._release_reply(reply)

    async def _call(
        self, operation: str, script: Script, keys: list[str], args: list[object],
    ) -> object:
        with _mapped(self, operation):
            return await script.run_async(self.redis, keys, args)


class AsyncLeaderElector(ElectorCore):
    """:class:`buttress.LeaderElector` as a task on the running event loop.

    A Redis call that hangs is left running (not cancelled) while the elector
    steps down at the deadline; the next call waits behind it, as in the
    threaded elector.  Callbacks are plain functions called on the loop.
    """

    election: AsyncLeaderElection

    def _init_driver(self) -> None:
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: asyncio.Task[bool] | None = None

    def start(self) -> AsyncLeaderElector:
        """Start contending on the running loop (idempotent while running)."""
        if self._task is not None and not self._task.done():
            return self
        if self._stopping.is_set():
            raise RuntimeError("a stopped AsyncLeaderElector cannot be restarted")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"buttress-leader-{self.instance_id}")
        return self

    async def stop(self, timeout: float = 5.0) -> None:
        """Step down (``on_lost``), release the lease and end the task."""
        self._stop_timeout = require_number("timeout", timeout, above=0)
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                logger.warning("elector %r: task did not stop within %.3gs",
                               self.instance_id, timeout)

    async def __aenter__(self) -> AsyncLeaderElector:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        steps = self._steps()
        outcome: asyncio.Task[bool] | None = None
        try:
            while not self._stopping.is_set():
                step = steps.send(outcome)
                if isinstance(step, _Sleep):
                    outcome = None
                    await self._wait(None, step.until)
                else:
                    outcome = await self._call(step.operation, until=step.until)
        except Exception:
            logger.exception("elector %r: task failed", self.instance_id)
        finally:
            await self._shutdown()

    async def _call(self, operation: str, *, until: float) -> asyncio.Task[bool] | None:
        """Run the operation after any call still in flight; None at ``until`` or on stop."""
        function = (self.election.acquire_leader if operation == "acquire"
                    else self.election.renew_leader)
        task = asyncio.ensure_future(self._after(self._in_flight, function))
        # A call abandoned at its deadline may fail later: mark its error seen.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._in_flight = task
        await self._wait(task, until)
        return task if task.done() else None

    async def _after(self, previous: asyncio.Task[bool] | None,
                     function: Callable[[str], Any]) -> bool:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        return bool(await function(self.instance_id))

    async def _wait(self, task: asyncio.Task[Any] | None, until: float) -> None:
        """Until ``task`` finishes (if given), ``until`` passes, or the elector stops."""
        stopping = asyncio.ensure_future(self._stopping.wait())
        waiting: set[asyncio.Future[Any]] = {stopping} if task is None else {stopping, task}
        timeout = None if until == math.inf else max(0.0, until - time.monotonic())
        try:
            await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()

    async def _shutdown(self) -> None:
        self._stepping_down()
        try:
            # After any call in flight, so an acquire that wins late is released too.
            release = self._after(self._in_flight, self.election.release_leader)
            await asyncio.wait_for(release, self._stop_timeout)
        except Exception as exc:  # the lease expires by itself
            logger.warning("elector %r: release failed: %r", self.instance_id, exc)
        if self._in_flight is not None and not self._in_flight.done():
            self._in_flight.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._in_flight


class AsyncFencedStore(FencedResource):
    """:class:`buttress.FencedStore` for a ``redis.asyncio`` client."""

    _ASYNC = True

    async def write(
        self, fencing_token: int, field: str | bytes, value: str | bytes | int | float,
    ) -> None:
        """Set ``field`` to ``value`` if ``fencing_token`` is current; else FencingRejected."""
        keys, args = self._write_request(fencing_token, field, value)
        with _mapped(self, "write"):
            reply = await self.WRITE.run_async(self.redis, keys, args)
        self._write_reply(fencing_token, reply)

    async def read(self, field: str | bytes) -> Any:
        """The value of ``field`` (as the client returns it), or None."""
        with _mapped(self, "read"):
            return await self.redis.hget(self.data_key, field)

    async def highest_token(self) -> int | None:
        """The highest token accepted so far, or None before the first write."""
        with _mapped(self, "read"):
            value = await self.redis.get(self.token_key)
        return None if value is None else int(value)
