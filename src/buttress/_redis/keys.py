"""Key building: one hash tag per logical object, so its keys share a Redis Cluster slot."""

from __future__ import annotations

from buttress._validate import require_str

__all__ = ["Keys", "check_tag"]


def check_tag(name: str, value: object) -> str:
    """``value`` if it can be a hash tag: a non-empty str without ``{`` or ``}``."""
    return require_str(name, value, forbidden="{}")


class Keys:
    """The keys of one logical object: ``prefix:{tag}:part`` (``{tag}:part`` without prefix).

    Redis Cluster hashes only the text between the first ``{`` and ``}``, so
    every key built here lands in the slot of ``tag`` and a script may touch
    them all.  The tag is checked by the caller (:func:`check_tag`), which
    knows the argument's name.
    """

    __slots__ = ("base", "base_bytes", "tag")

    def __init__(self, tag: str, prefix: str = "") -> None:
        self.tag = tag
        self.base = f"{prefix}:{{{tag}}}" if prefix else f"{{{tag}}}"
        self.base_bytes = (self.base + ":").encode()

    def key(self, *parts: str) -> str:
        """The key for ``parts`` joined by ``:`` under this object's tag."""
        return ":".join((self.base, *parts))

    def __repr__(self) -> str:
        return f"Keys({self.base!r})"
