"""Argument checks shared by the pure-Python modules, so their errors read alike."""

from __future__ import annotations

from typing import Any

__all__ = ["require_int"]


def require_int(name: str, value: Any, *, minimum: int) -> None:
    """Raise unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
