"""Pure-Python twins of buttress's native modules.

Each twin has the same public API as the native object it mirrors (a test
compares their signatures) and gives the same results: for the Bloom filter,
the same bits.  They exist so users can compare, and as the tests' oracle.

=================================  ==========================================
native                             twin
=================================  ==========================================
``buttress._hash``                 ``buttress.reference.hashing``
``buttress.BloomFilter``           ``buttress.reference.BloomFilter``
``buttress.PriorityDeque``         ``buttress.reference.PriorityDeque``
``buttress.TaskScheduler``         ``buttress.reference.TaskScheduler``
``buttress.AsyncTaskScheduler``    ``buttress.reference.AsyncTaskScheduler``
=================================  ==========================================
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "xxh64": "buttress.reference.hashing",
    "xxh64_many": "buttress.reference.hashing",
    "hash_key": "buttress.reference.hashing",
    "encode_key": "buttress.reference.hashing",
    "BloomFilter": "buttress.reference.bloom",
    "PriorityDeque": "buttress.reference.heap",
    "TaskScheduler": "buttress.reference.scheduler",
    "AsyncTaskScheduler": "buttress.reference.scheduler",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'buttress.reference' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
