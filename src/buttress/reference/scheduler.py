"""Pure-Python twins of ``buttress.TaskScheduler`` and ``AsyncTaskScheduler``: the same
schedulers, on the twin deque.

There is one scheduler per driver (``buttress.scheduler``,
``buttress.scheduler_async``), over one core of rules; these twins only plug
the pure-Python ``PriorityDeque`` in where the native one was, so they differ
in the heap alone and the tests run one suite against all four.
"""

from __future__ import annotations

from buttress import scheduler, scheduler_async
from buttress.reference.heap import PriorityDeque

__all__ = ["AsyncTaskScheduler", "TaskScheduler"]


class TaskScheduler(scheduler.TaskScheduler):
    __doc__ = scheduler.TaskScheduler.__doc__

    _deque_class = PriorityDeque


class AsyncTaskScheduler(scheduler_async.AsyncTaskScheduler):
    __doc__ = scheduler_async.AsyncTaskScheduler.__doc__

    _deque_class = PriorityDeque
