"""Answering an ASGI ``lifespan`` scope: one helper for every ASGI app in buttress.

Public as ``buttress.shutdown.lifespan`` so an app served by ``serve_asgi``
answers uvicorn's start-up and shutdown the same way the gateway does.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["lifespan"]

logger = logging.getLogger("buttress.lifespan")

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def lifespan(receive: Receive, send: Send, *,
                   startup: Callable[[], Awaitable[None]] | None = None,
                   shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
    """Answer an ASGI ``lifespan`` scope, running ``startup`` and ``shutdown`` (coroutines).

    A hook that raises is reported to the server as ``...failed`` with the
    error (uvicorn then refuses to start, or logs it at shutdown).  Used by the
    gateway (its shutdown awaits the admissions in flight and closes its Redis
    client on the loop that used it) and by examples/slow_service.py (no hooks).
    """
    while True:
        message = await receive()
        phase = message["type"].rpartition(".")[2]  # startup or shutdown
        hook = startup if phase == "startup" else shutdown
        try:
            if hook is not None:
                await hook()
        except Exception as exc:
            logger.exception("lifespan %s failed", phase)
            await send({"type": f"lifespan.{phase}.failed", "message": repr(exc)})
            return
        await send({"type": f"lifespan.{phase}.complete"})
        if phase == "shutdown":
            return
