"""xDS streams (state of the world): Envoy's requests read into a queue as they come, so that
a server can wait on the next request or on a change of what it serves, whichever first."""

from __future__ import annotations

import asyncio
import contextlib


class Requests:
    """async with Requests(request_iterator) as reqs: await reqs.next_or(event_coro) -> the next
    request, None when the stream ended, or CHANGED when event_coro finished first."""

    CHANGED = object()

    def __init__(self, request_iterator):
        self._it = request_iterator
        self._q: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Requests:
        self._task = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    async def _read(self) -> None:
        try:
            async for req in self._it:
                await self._q.put(req)
        finally:
            await self._q.put(None)

    async def next(self):
        return await self._q.get()

    async def next_or(self, change):
        """The next request (None: the stream ended), or CHANGED once the coroutine change
        returns first."""
        nxt = asyncio.ensure_future(self._q.get())
        other = asyncio.ensure_future(change)
        done, _ = await asyncio.wait({nxt, other}, return_when=asyncio.FIRST_COMPLETED)
        other.cancel()
        if nxt in done:
            return nxt.result()
        nxt.cancel()
        return self.CHANGED
