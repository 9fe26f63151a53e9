"""Stream what a runner's engine thread (``engine.py``) produces into asyncio.

MLX and llama.cpp calls block and are not safe to interleave from several threads, so each
runner's calls run on an engine thread; chunks cross back to the event loop through a queue.
Closing the async iterator (a client that went away) sets the request's cancel token, which
the engine checks every step, so the slot is freed within one token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

END = object()
"""Put on a queue after a producer's last item."""


async def drain(queue: asyncio.Queue[object]) -> AsyncIterator[Any]:
    """The items a producer thread puts on ``queue`` up to ``END``; an exception it puts there
    is raised here, in the consumer."""
    while True:
        item = await queue.get()
        if item is END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
