"""Lua scripts kept as ``.lua`` files in this package, run by SHA.

Each file starts with a comment stating its KEYS/ARGV contract.  A script is
read once per process (:func:`load_script` caches), sent by EVALSHA, and
loaded with SCRIPT LOAD only when the server answers NOSCRIPT (first use,
after a restart without persistence, a failover or SCRIPT FLUSH); the call is
then repeated once.  ``execute_command`` straight, not redis-py's ``Script``
wrapper, which costs about 15 us per call on a path where the whole round
trip is 100.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

__all__ = ["Script", "load_script"]


class Script:
    """One Lua script: its ``name`` (file name), ``source`` and ``sha`` (SHA1 of the source)."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def run(self, client: Any, keys: list[Any], args: list[Any]) -> Any:
        """EVALSHA on a sync client; after NOSCRIPT, load the script and send again."""
        try:
            return client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def run_async(self, client: Any, keys: list[Any], args: list[Any]) -> Any:
        """:meth:`run` for a ``redis.asyncio`` client."""
        try:
            return await client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    def __repr__(self) -> str:
        return f"Script({self.name!r}, sha={self.sha[:12]})"


@functools.cache
def load_script(filename: str) -> Script:
    """The script in ``buttress/_redis/<filename>`` (read once per process)."""
    source = resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")
    return Script(filename, source)
