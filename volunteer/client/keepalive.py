"""Telling a server that is slow from one that is gone, while a reply is awaited.

A host that vanishes without a reset (power lost, a laptop lid shut, a process stopped)
leaves its stream open and silent: the wait for its reply would only end at the step
timeout, set long enough for a legitimate prefill. So once a reply is late by
`Keepalive.after_s`, the server is asked a cheap question on another stream (its `info`)
every `after_s`; a server that is computing answers it at once (its event loop is free
while its compute thread works), and one that does not answer within `timeout_s` is
given up on then, not at the end of the step timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TypeVar

from volunteer.transport.protocol import PeerUnavailableError, RemoteError
from volunteer.transport.queue_wait import get_within

Item = TypeVar("Item")


@dataclasses.dataclass(frozen=True)
class Keepalive:
    after_s: float = 2.0
    """A reply awaited this long has its server pinged, and pinged again each time this
    passes: shorter than any step timeout, longer than a usual decode step (which then
    costs no ping and no task)."""
    timeout_s: float = 4.0
    """A ping unanswered this long means the server is gone: several round trips of a
    slow link, with room for a loaded server's event loop to get to it."""


async def get_alive(
    queue: asyncio.Queue[Item],
    timeout_s: float,
    *,
    ping: Callable[[float], Awaitable[object]],
    keepalive: Keepalive,
) -> Item:
    """The queue's next item, waited for at most timeout_s; while it is late, the sender
    is pinged (`ping(timeout_s)`, see `Keepalive`).

    Raises:
        asyncio.TimeoutError: nothing came within timeout_s (nothing is taken then).
        PeerUnavailableError: a ping failed (nothing is taken then).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    # The usual reply comes before the first ping is due: no task, no ping.
    first_s = min(timeout_s, keepalive.after_s)
    try:
        return await get_within(queue, first_s)
    except asyncio.TimeoutError:
        if first_s >= timeout_s:
            raise
    getting = asyncio.ensure_future(queue.get())
    watching = asyncio.ensure_future(_watch(ping, keepalive))
    try:
        left = deadline - loop.time()
        done, _ = await asyncio.wait(
            {getting, watching}, timeout=max(left, 0.0), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        # A get cancelled before it ran takes nothing off the queue.
        for task in (getting, watching):
            if not task.done():
                task.cancel()
        await asyncio.gather(getting, watching, return_exceptions=True)
    if getting in done:
        return getting.result()
    if watching in done:
        watching.result()  # raises the ping's failure: nothing else ends the watch
    raise asyncio.TimeoutError


async def _watch(ping: Callable[[float], Awaitable[object]], keepalive: Keepalive) -> None:
    """Pings every keepalive.after_s until a ping fails.

    Raises:
        PeerUnavailableError: a ping failed or was not answered in keepalive.timeout_s.
    """
    while True:
        try:
            await asyncio.wait_for(ping(keepalive.timeout_s), keepalive.timeout_s)
        except RemoteError:
            pass  # it answered, if only with an error: it is there
        except asyncio.TimeoutError as exc:
            raise PeerUnavailableError(
                f"no answer to a keepalive ping within {keepalive.timeout_s:g} s"
            ) from exc
        except PeerUnavailableError as exc:
            raise PeerUnavailableError(f"a keepalive ping failed: {exc}") from exc
        await asyncio.sleep(keepalive.after_s)
