"""AsyncTaskScheduler, native and twin deque, on asyncio and on uvloop.

The stress test and the admission model are shared with TaskScheduler
(tests/test_scheduler.py runs them against all four schedulers); this file
holds what is about coroutines: awaiting and cancelling handles (queued and
running), tasks that use their own scheduler, loops and bad input.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import threading
import time
import warnings
from concurrent.futures import CancelledError
from fractions import Fraction

import pytest
import uvloop

import buttress
from buttress import Expired, Rejected
from buttress.reference.scheduler import AsyncTaskScheduler as TwinScheduler
from buttress.scheduler_async import AsyncTaskHandle
from buttress.scheduler_async import AsyncTaskScheduler as NativeScheduler


@pytest.fixture(params=[pytest.param(NativeScheduler, id="native"),
                        pytest.param(TwinScheduler, id="twin")])
def Scheduler(request):
    return request.param


@pytest.fixture(params=[pytest.param(asyncio.new_event_loop, id="asyncio"),
                        pytest.param(uvloop.new_event_loop, id="uvloop")])
def run(request):
    """Run a coroutine to its end on a fresh loop of the kind under test."""
    loops = []

    def run_on_loop(coroutine, *, timeout=60):
        loop = request.param()
        loops.append(loop)
        return loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    yield run_on_loop
    for loop in loops:
        loop.close()


def assert_accounting(stats):
    ends = ("shed", "expired", "cancelled", "completed", "failed", "queued", "running")
    assert stats["accepted"] == sum(stats[k] for k in ends), stats


async def noop():
    return None


async def square(number):
    await asyncio.sleep(0)
    return number * number


class Gate:
    """A coroutine task that holds its worker until opened."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def __call__(self):
        self.entered.set()
        await self.opened.wait()
        return "gate"


async def hold_a_worker(scheduler, priority=10):
    """Enqueue a Gate and wait until a worker is inside it; return the gate."""
    gate = Gate()
    scheduler.enqueue(gate, priority)
    await gate.entered.wait()
    return gate


# -- running, order, results ---------------------------------------------------

def test_runs_coroutines_most_important_first_fifo_among_equals(Scheduler, run):
    async def main():
        ran = []

        async def record(name):
            ran.append(name)
            return name

        scheduler = Scheduler(1)
        handles = [scheduler.enqueue(functools.partial(record, name), priority)
                   for name, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 9), ("e", 5)]]
        async with scheduler.start():
            assert [await h for h in handles] == ["a", "b", "c", "d", "e"]
        assert ran == ["d", "b", "e", "a", "c"]
        assert scheduler.state == "stopped"
        summary = scheduler.stats()
        assert summary["completed"] == 5 and summary["workers"] == 0
        assert_accounting(summary)

    run(main())


def test_results_failures_and_the_worker_survives(Scheduler, run):
    async def main():
        async with Scheduler(2) as scheduler:
            squares = [scheduler.enqueue(functools.partial(square, i)) for i in range(50)]

            async def boom():
                raise KeyError("boom")

            bad = scheduler.enqueue(boom)
            assert [await h for h in squares] == [i * i for i in range(50)]
            with pytest.raises(KeyError, match="boom"):
                await bad
            assert bad.status == "failed" and isinstance(bad.exception(), KeyError)
            assert await scheduler.enqueue(functools.partial(square, 3)) == 9
        summary = scheduler.stats()
        assert summary["failed"] == 1 and summary["completed"] == 51
        assert_accounting(summary)

    run(main())


def test_a_task_past_its_deadline_is_not_run(Scheduler, run):
    async def main():
        async with Scheduler(1) as scheduler:
            gate = await hold_a_worker(scheduler)
            late = scheduler.enqueue(noop, deadline=time.monotonic() - 1)
            gate.opened.set()
            with pytest.raises(Expired):
                await late
        assert scheduler.stats()["expired"] == 1

    run(main())


# -- cancellation ---------------------------------------------------------------------

def test_cancel_a_queued_task(Scheduler, run):
    async def main():
        async with Scheduler(1) as scheduler:
            gate = await hold_a_worker(scheduler)
            queued = scheduler.enqueue(noop)
            assert queued.cancel() and queued.cancel()  # True again: it is cancelled
            assert queued.cancelled() and queued.status == "cancelled"
            with pytest.raises(CancelledError):
                await queued
            gate.opened.set()
        stats = scheduler.stats()
        assert stats["cancelled"] == 1 and stats["completed"] == 1
        assert_accounting(stats)

    run(main())


def test_cancel_a_running_task_and_the_worker_goes_on(Scheduler, run):
    async def main():
        seen = []

        async def long():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                seen.append("cancelled inside")
                raise

        async with Scheduler(1) as scheduler:
            running = scheduler.enqueue(long, 5)
            after = scheduler.enqueue(functools.partial(square, 4))
            while not running.running():
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.01)  # inside its sleep
            assert running.cancel() is True and running.cancel() is True
            with pytest.raises(CancelledError):
                await running
            assert running.status == "cancelled" and seen == ["cancelled inside"]
            assert await after == 16  # the same worker, not cancelled
        stats = scheduler.stats()
        assert stats["cancelled"] == 1 and stats["completed"] == 1 and stats["workers"] == 0
        assert_accounting(stats)

    run(main())


def test_a_running_task_that_swallows_its_cancel_completes_and_harms_no_other(Scheduler, run):
    async def main():
        async def stubborn():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                return "kept going"

        async def cancels_itself():
            assert handles[1].cancel()  # asked while running, never awaits again
            return "done anyway"

        async with Scheduler(1) as scheduler:
            handles = [scheduler.enqueue(stubborn, 9)]
            handles.append(scheduler.enqueue(cancels_itself, 8))
            handles.append(scheduler.enqueue(functools.partial(square, 5), 7))
            while not handles[0].running():
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.01)
            assert handles[0].cancel()
            assert await handles[0] == "kept going"
            assert await handles[1] == "done anyway"
            assert await handles[2] == 25  # the pending cancel did not land here
            assert await scheduler.enqueue(functools.partial(square, 6)) == 36
        assert scheduler.stats()["completed"] == 4

    run(main())


def test_cancelling_an_awaiter_cancels_the_task_as_with_asyncio_tasks(Scheduler, run):
    async def main():
        async with Scheduler(1) as scheduler:
            gate = await hold_a_worker(scheduler)
            queued = scheduler.enqueue(noop)
            waiter = asyncio.ensure_future(_await(queued))
            await asyncio.sleep(0.01)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert queued.status == "cancelled"
            shielded = scheduler.enqueue(functools.partial(square, 2))
            waiter = asyncio.ensure_future(asyncio.shield(shielded))
            await asyncio.sleep(0.01)
            waiter.cancel()
            gate.opened.set()
            assert await shielded == 4

    run(main())


async def _await(awaitable):
    return await awaitable


def test_a_cancelled_worker_cancels_what_it_holds_and_the_books_balance(Scheduler):
    """asyncio.run() ending without shutdown() cancels the workers: nothing is left hanging."""
    scheduler = Scheduler(1)
    handles = []

    async def main():
        scheduler.start()
        gate = Gate()
        handles.append(scheduler.enqueue(gate, 10))
        handles.extend(scheduler.enqueue(noop) for _ in range(3))
        await gate.entered.wait()

    asyncio.run(main())
    assert [h.status for h in handles] == ["cancelled"] + ["queued"] * 3
    stats = scheduler.stats()
    assert stats["workers"] == 0 and stats["cancelled"] == 1 and stats["queued"] == 3
    assert_accounting(stats)


# -- tasks that use their own scheduler ------------------------------------------------

def test_a_task_enqueues_into_its_own_scheduler_and_awaits_it(Scheduler, run):
    async def main():
        async with Scheduler(2) as scheduler:
            async def parent():
                child = scheduler.enqueue(functools.partial(square, 7), 100)
                return await child + 1

            assert await scheduler.enqueue(parent) == 50
        assert scheduler.stats()["completed"] == 2

    run(main())


def test_shutdown_from_inside_a_task(Scheduler, run):
    async def main():
        scheduler = Scheduler(2).start()

        async def stop():
            return await scheduler.shutdown(drain=True, timeout=5)

        summary = await scheduler.enqueue(stop)
        assert summary["state"] == "shutting_down" and not summary["timed_out"]
        while scheduler.state != "stopped":  # the last worker out stops it
            await asyncio.sleep(0.001)
        final = await scheduler.shutdown()
        assert final["state"] == "stopped" and final["workers"] == 0
        with pytest.raises(Rejected) as refused:
            scheduler.enqueue(noop)
        assert refused.value.state == "shutting_down"

    run(main())


def test_two_tasks_shutting_down_at_once_do_not_wait_for_each_other(Scheduler, run):
    async def main():
        scheduler = Scheduler(2).start()
        arrived = []
        both = asyncio.Event()

        async def stop():
            arrived.append(1)
            if len(arrived) == 2:
                both.set()
            await both.wait()  # one per worker, both inside shutdown() together
            return await scheduler.shutdown(drain=True)

        handles = [scheduler.enqueue(stop) for _ in range(2)]
        summaries = [await h for h in handles]
        assert [s["state"] for s in summaries] == ["shutting_down"] * 2
        while scheduler.state != "stopped":
            await asyncio.sleep(0.001)

    run(main(), timeout=20)


def test_shutdown_without_drain_and_with_a_timeout(Scheduler, run):
    async def main():
        scheduler = Scheduler(1).start()
        gate = await hold_a_worker(scheduler)
        queued = [scheduler.enqueue(noop) for _ in range(3)]
        summary = await scheduler.shutdown(drain=True, timeout=0.05)
        assert summary["timed_out"] and summary["cancelled_by_shutdown"] == 3
        assert summary["state"] == "shutting_down" and summary["running"] == 1
        assert [h.status for h in queued] == ["cancelled"] * 3
        gate.opened.set()
        final = await scheduler.shutdown(drain=False, timeout=10)
        assert final["state"] == "stopped" and final["completed"] == 1
        assert_accounting(final)

    run(main())


# -- backpressure -------------------------------------------------------------------

def test_hysteresis_with_real_workers(Scheduler, run):
    async def main():
        changes = []
        scheduler = Scheduler(1, high_water=8, low_water=2, max_size=100, shed_below=1,
                              on_state_change=lambda old, new: changes.append((old, new)))
        async with scheduler:
            gate = await hold_a_worker(scheduler, 100)
            handles = [scheduler.enqueue(noop) for _ in range(8)]
            assert scheduler.state == "shedding"
            with pytest.raises(Rejected) as refused:
                scheduler.enqueue(noop, 0)
            assert refused.value.state == "shedding" and refused.value.retry_after > 0
            handles.append(scheduler.enqueue(noop, 1))
            gate.opened.set()
            for handle in handles:
                await handle
            assert changes == [("normal", "shedding"), ("shedding", "normal")]
        assert changes[-1] == ("shutting_down", "stopped")

    run(main())


def test_overflow_block_is_an_awaitable_wait(Scheduler, run):
    async def main():
        scheduler = Scheduler(1, high_water=2, low_water=1, max_size=2, shed_below=0,
                              overflow="block", block_timeout=0.05)
        async with scheduler:
            gate = await hold_a_worker(scheduler)
            scheduler.enqueue(noop)
            scheduler.enqueue(noop)
            with pytest.raises(Rejected, match="enqueue_wait"):
                scheduler.enqueue(noop)  # enqueue() never waits
            with pytest.raises(Rejected, match="queue full"):
                await scheduler.enqueue_wait(noop)  # waited block_timeout: no room
            scheduler.block_timeout = 30
            waiting = asyncio.ensure_future(scheduler.enqueue_wait(
                functools.partial(square, 9)))
            await asyncio.sleep(0.02)
            assert not waiting.done()
            gate.opened.set()
            assert await (await waiting) == 81
        assert scheduler.stats()["rejected"] == 2

    run(main())


# -- handles are futures ----------------------------------------------------------

def test_async_handles_are_concurrent_futures(Scheduler, run):
    async def main():
        async with Scheduler(2) as scheduler:
            handle = scheduler.enqueue(functools.partial(square, 3))
            assert isinstance(handle, concurrent.futures.Future)
            assert isinstance(handle, buttress.TaskHandle)
            called = []
            handle.add_done_callback(lambda h: called.append(h.result()))
            assert await asyncio.wrap_future(handle) == 9
            assert called == [9]
            pending = scheduler.enqueue(functools.partial(asyncio.sleep, 0.01, "late"))
            with pytest.raises(RuntimeError, match="block the event loop"):
                pending.result()  # on the loop's thread it would deadlock
            assert await pending == "late"
            other = scheduler.enqueue(functools.partial(square, 5))
            # From another thread, result() waits like any Future's.
            assert await asyncio.to_thread(other.result, 10) == 25

    run(main())


# -- bad input ----------------------------------------------------------------------

def test_enqueue_takes_coroutine_functions_only(Scheduler, run):
    class AsyncCallable:
        async def __call__(self):
            return "called"

    async def main():
        async with Scheduler(1) as scheduler:
            with pytest.raises(TypeError, match="coroutine function"):
                scheduler.enqueue(lambda: None)
            with pytest.raises(TypeError, match="coroutine function"):
                scheduler.enqueue(print)
            with pytest.raises(TypeError, match="coroutine function"):
                scheduler.enqueue(5)
            coroutine = noop()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # closed, not left "never awaited"
                with pytest.raises(TypeError, match="coroutine object"):
                    scheduler.enqueue(coroutine)
                gc.collect()
            assert await scheduler.enqueue(AsyncCallable()) == "called"
            assert await scheduler.enqueue(functools.partial(square, 2)) == 4
            for priority, error in [("high", TypeError), (True, TypeError),
                                    (float("nan"), ValueError), (2**60, ValueError),
                                    (Fraction(10**400, 3), ValueError)]:
                with pytest.raises(error):
                    scheduler.enqueue(noop, priority)
            with pytest.raises(TypeError, match="deadline"):
                scheduler.enqueue(noop, deadline="soon")
            stats = scheduler.stats()
            assert stats["rejected"] == 0 and stats["accepted"] == 2

    run(main())


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"workers": "5"}, TypeError, "workers must be an int"),
    ({"workers": 0}, ValueError, "workers must be >= 1"),
    ({"high_water": 10, "low_water": 10}, ValueError, "low_water must be < high_water"),
    ({"overflow": "drop"}, ValueError, "overflow must be one of"),
    ({"block_timeout": "1"}, TypeError, "block_timeout"),
    ({"shed_below": "high"}, TypeError, "shed_below"),
    ({"on_state_change": 3}, TypeError, "on_state_change must be callable"),
])
def test_bad_configuration(Scheduler, kwargs, error, match):
    with pytest.raises(error, match=match):
        Scheduler(**kwargs)


def test_outside_a_loop_and_from_another_loop_is_a_runtime_error(Scheduler):
    scheduler = Scheduler(1)
    with pytest.raises(RuntimeError, match="running event loop"):
        scheduler.enqueue(noop)
    with pytest.raises(RuntimeError, match="running event loop"):
        scheduler.start()

    async def first():
        scheduler.start()
        return await scheduler.enqueue(functools.partial(square, 2))

    assert asyncio.run(first()) == 4

    async def second():
        scheduler.enqueue(noop)

    with pytest.raises(RuntimeError, match="different event loop"):
        asyncio.run(second())  # the same thread, a new loop
    errors = []

    def in_another_thread():
        try:
            asyncio.run(second())
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=in_another_thread)
    thread.start()
    thread.join(30)
    assert errors and "different event loop" in errors[0]
    assert scheduler.stats()["accepted"] == 1


def test_handles_are_made_by_the_scheduler_only():
    assert AsyncTaskHandle.__mro__[1] is buttress.TaskHandle
    assert buttress.AsyncTaskScheduler is NativeScheduler
    assert buttress.AsyncTaskHandle is AsyncTaskHandle
    assert buttress.reference.AsyncTaskScheduler is TwinScheduler
