"""Pinging the peers that records name (`volunteer.daemon.liveness`), over real p2p."""

from __future__ import annotations

import asyncio
import time

from hivemind.p2p import P2P, PeerID

from volunteer.daemon.liveness import Liveness

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def _check() -> tuple[Liveness, list[str], float]:
    here = await P2P.create(host_maddrs=LOOPBACK)
    try:
        liveness = Liveness(lambda: here)
        # Forged records: 20 peer ids that no daemon holds.
        forged = [PeerID(bytes([0x12, 0x20, *([i] * 32)])).to_base58() for i in range(20)]
        began = time.monotonic()
        assert await liveness.first_alive(forged, max_pings=3) is False
        return liveness, forged, time.monotonic() - began
    finally:
        await here.shutdown()


def test_peers_that_never_answer_cost_a_bounded_number_of_pings() -> None:
    liveness, forged, took_s = asyncio.run(_check())
    assert liveness.pings == 3
    assert set(liveness.dead) == set(forged[:3])  # the others: unknown, not pinged yet
    # Three peers, at most two pings of 3 s and a 1 s pause each.
    assert took_s < 3 * 7.5
    # Counted dead, they are not pinged again in the next round.
    assert asyncio.run(liveness.first_alive(forged[:3], max_pings=10)) is False
    assert liveness.pings == 3
