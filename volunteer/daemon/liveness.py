"""Which servers are really there: a crashed server's ONLINE records outlive it.

Records expire only a few announce periods after their server died, so wherever a hole
matters (`volunteer.daemon.hole_watch`, `volunteer.daemon.hand_over`) the servers that
records name are pinged: one that answered lately counts as alive, one that missed two
pings in a row as dead for a while (then it may be pinged again: a restarted server
keeps its peer id).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from hivemind.p2p import P2P, PeerID

from volunteer.client.remote_span import ping
from volunteer.transport.protocol import PeerUnavailableError, RemoteError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
PROBE_RETRY_S = 1.0
ALIVE_FOR_S = 6.0
"""A server that answered a ping counts as alive this long without another."""
DEAD_FOR_S = 30.0
"""A server that missed its pings counts as dead this long before it is pinged again."""
MAX_PINGS = 8
"""Servers pinged in one round (a look, a survey) at most: records may name any number
of peers that never answer, and each costs up to two timeouts."""


class Liveness:
    """What pings found of each peer, remembered a while (see the module doc).

    Args:
        p2p: gives the running P2P daemon to ping from.
        clock: monotonic seconds.
    """

    def __init__(
        self, p2p: Callable[[], P2P], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._p2p = p2p
        self._clock = clock
        self.answered: dict[str, float] = {}
        """When each peer last answered a ping."""
        self.dead: dict[str, float] = {}
        """When each peer counted dead was found so (it missed two pings in a row)."""
        self.pings = 0
        """Peers pinged so far (a caller may bound its pings per round with it)."""

    def forget_old(self) -> None:
        """Drops what is too old to go by: those peers get pinged again when needed."""
        now = self._clock()
        self.answered = {p: at for p, at in self.answered.items() if now - at < ALIVE_FOR_S}
        self.dead = {p: at for p, at in self.dead.items() if now - at < DEAD_FOR_S}

    async def first_alive(self, peers: Sequence[str], *, max_pings: int | None = None) -> bool:
        """Whether one of `peers` is there: one that answered lately, else the first of
        them (not counted dead) to answer a ping now; stops pinging at `max_pings` in
        all (then False: not known yet)."""
        candidates = [peer for peer in peers if peer not in self.dead]
        if any(peer in self.answered for peer in candidates):
            return True
        for peer_id in candidates:
            if max_pings is not None and self.pings >= max_pings:
                return False
            self.pings += 1
            if await answers_ping(self._p2p(), peer_id):
                self.answered[peer_id] = self._clock()
                return True
            logger.info("server %s answers no ping: counting it as gone", peer_id)
            self.dead[peer_id] = self._clock()
        return False


async def answers_ping(p2p: P2P, peer_id: str) -> bool:
    """Whether `peer_id` answers one of two pings (`PROBE_RETRY_S` apart)."""
    for attempt in range(2):
        if attempt:
            await asyncio.sleep(PROBE_RETRY_S)
        try:
            await ping(p2p, PeerID.from_base58(peer_id), PROBE_TIMEOUT_S)
            return True
        except RemoteError:  # an error is an answer: it is there
            return True
        except (PeerUnavailableError, TimeoutError):
            continue
        except ValueError:  # not a peer id: nothing to ping
            return True
    return False
