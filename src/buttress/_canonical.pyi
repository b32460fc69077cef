from collections.abc import Callable
from typing import Any

def canonical_xxh64(payload: Any, fallback: Callable[[Any], int]) -> int: ...
