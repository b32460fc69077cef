"""The one validation rule for buttress's public arguments, so every error reads alike.

The rule (docs/errors.md says it for users):

* **Wrong type -> TypeError**; the right type with a wrong value -> ValueError.
  ``workers='5'`` and ``ttl_ms='5'`` are both TypeErrors; ``workers=0`` is a
  ValueError.
* ``bool`` is never accepted where a number is asked for (``True`` is an int to
  Python, not to a caller who passed it by mistake).
* Numeric strings are accepted only where the input comes from the environment
  or a command line, through :func:`parse_int_setting` /
  :func:`parse_number_setting`, whose errors name the setting.
* Messages name the argument and show the value: ``"workers must be >= 1, got 0"``.

Every public constructor and entry point checks its arguments through these
functions (tests/test_validation.py walks them all).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Collection
from typing import Any, TypeVar

__all__ = [
    "check_each",
    "parse_int_setting",
    "parse_number_setting",
    "require_bool",
    "require_callable",
    "require_choice",
    "require_int",
    "require_number",
    "require_path",
    "require_str",
]

_T = TypeVar("_T")


def _show(value: Any) -> str:
    """The value as it goes into a message: repr, cut so a huge input stays readable."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def require_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an int in ``minimum..maximum`` (either bound optional).

    Accepts ``int`` and numpy integers (anything registered as
    ``numbers.Integral``), never ``bool``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {_show(value)}")
    value = int(value)
    _check_range(name, value, minimum, maximum)
    return value


def require_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> float:
    """``value`` as a finite float within the bounds (``above`` is a strict lower bound).

    Accepts int, float and other ``numbers.Real`` (Fraction, numpy floats),
    never ``bool``; NaN and infinities are ValueErrors.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{name} is out of range, got {_show(value)}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {_show(value)}")
    if above is not None and not number > above:
        raise ValueError(f"{name} must be > {above}, got {_show(value)}")
    _check_range(name, number, minimum, maximum)
    return number


def require_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool (``0``/``1``/``"yes"`` are TypeErrors)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}: {_show(value)}")
    return value


def require_str(
    name: str,
    value: Any,
    *,
    allow_empty: bool = False,
    max_bytes: int | None = None,
    forbidden: str = "",
) -> str:
    """``value`` if it is a str, non-empty unless allowed, within ``max_bytes`` of UTF-8.

    ``forbidden`` lists characters that may not appear (for example ``"{}"``
    in names that become Redis hash tags).
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}: {_show(value)}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    bad = sorted({ch for ch in forbidden if ch in value})
    if bad:
        raise ValueError(f"{name} must not contain {' or '.join(map(repr, bad))}, "
                         f"got {_show(value)}")
    if max_bytes is not None:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ValueError(f"{name} is not valid UTF-8 text: {_show(value)}") from exc
        if size > max_bytes:
            raise ValueError(f"{name} must be at most {max_bytes} bytes of UTF-8, "
                             f"got {size} bytes: {_show(value)}")
    return value


def require_path(name: str, value: Any) -> str:
    """``value`` as a filesystem path string (``str`` or ``os.PathLike``)."""
    try:
        path = os.fspath(value)
    except TypeError:
        raise TypeError(f"{name} must be a str or os.PathLike path, got "
                        f"{type(value).__name__}: {_show(value)}") from None
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a str or os.PathLike path (not bytes), got "
                        f"{_show(value)}")
    if not path:
        raise ValueError(f"{name} must not be empty")
    return path


def require_callable(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """``value`` if it is callable (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}: {_show(value)}")
    return value


def require_choice(name: str, value: Any, choices: Collection[_T]) -> _T:
    """``value`` if it is one of ``choices`` (a ValueError listing them otherwise).

    A value of a different type than every choice is still a ValueError here:
    the caller picks from a list, and the list is what the message must show.
    """
    try:
        if value in choices:
            return value
    except TypeError:  # unhashable value against a set of choices
        pass
    listed = ", ".join(repr(choice) for choice in choices)
    raise ValueError(f"{name} must be one of {listed}; got {_show(value)}")


def parse_int_setting(
    setting: str, text: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """An int from an environment variable or command-line flag named ``setting``.

    The one place numeric strings are accepted; a bad one is a ValueError
    naming the setting (``BUTTRESS_WORKERS must be an int, got 'five'``).
    """
    try:
        value = int(text.strip(), 10)
    except (ValueError, AttributeError):
        raise ValueError(f"{setting} must be an int, got {_show(text)}") from None
    _check_range(setting, value, minimum, maximum)
    return value


def parse_number_setting(
    setting: str,
    text: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> float:
    """A finite float from an environment variable or command-line flag named ``setting``."""
    try:
        value = float(text.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"{setting} must be a number, got {_show(text)}") from None
    return require_number(setting, value, minimum=minimum, maximum=maximum, above=above)


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in {minimum}..{maximum}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")


def check_each(name: str, values: Any, check: Callable[[str, Any], _T]) -> list[_T]:
    """Apply ``check`` to every element, naming the failing one as ``name[i]``."""
    return [check(f"{name}[{index}]", value) for index, value in enumerate(values)]
