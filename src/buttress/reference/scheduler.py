"""Pure-Python twin of ``buttress.TaskScheduler``: the same scheduler, on the twin deque.

There is one scheduler (``buttress.scheduler``); this twin only plugs the
pure-Python ``PriorityDeque`` in where the native one was, so the two differ
in the heap alone and the tests run one suite against both.
"""

from __future__ import annotations

from buttress import scheduler
from buttress.reference.heap import PriorityDeque

__all__ = ["TaskScheduler"]


class TaskScheduler(scheduler.TaskScheduler):
    __doc__ = scheduler.TaskScheduler.__doc__

    _deque_class = PriorityDeque
