"""Fetching evidence from a hostile accuser over real p2p on 127.0.0.1: a frame over the
chunk bound, a stream that never ends, bytes that are not the evidence named, and a
peer that never answers each end the fetch with a clear error, within bounds; and the
store answers only well-formed requests for what it holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest
from hivemind.p2p import P2P

from tests.server import LoopThread
from volunteer.transport import framing
from volunteer.transport.p2p_streams import open_stream
from volunteer.trust import evidence_exchange
from volunteer.trust.evidence_exchange import (
    CHUNK_BYTES,
    EVIDENCE_HANDLE,
    EvidenceFetchError,
    EvidenceStore,
    fetch_evidence,
)

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
BEHAVIOURS = ("huge frame", "endless", "other bytes", "silent", "honest")
HONEST_BYTES = b"evidence " * 1000


@pytest.fixture(scope="module")
def peers() -> Iterator[tuple[LoopThread, P2P, dict[str, P2P], str]]:
    """A loop, the judge, an accuser of each behaviour, and the honest one's evidence."""
    loop = LoopThread()
    store = EvidenceStore()
    honest_name = store.add(HONEST_BYTES)

    async def start() -> tuple[P2P, dict[str, P2P]]:
        accusers = {}
        for behaviour in BEHAVIOURS:
            p2p = await P2P.create(host_maddrs=LOOPBACK)
            handler = store.serve if behaviour == "honest" else _hostile(behaviour)
            await p2p.add_binary_stream_handler(EVIDENCE_HANDLE, handler)
            accusers[behaviour] = p2p
        known = [str(a) for p2p in accusers.values() for a in await p2p.get_visible_maddrs()]
        return await P2P.create(host_maddrs=LOOPBACK, initial_peers=known), accusers

    judge, accusers = loop.run(start(), timeout_s=60)
    try:
        yield loop, judge, accusers, honest_name
    finally:

        async def stop() -> None:
            for p2p in [judge, *accusers.values()]:
                await p2p.shutdown()

        loop.run(stop(), timeout_s=60)
        loop.close()


def _hostile(behaviour: str):
    async def serve(_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer), contextlib.suppress(Exception):
            await framing.read_frame(reader, max_bytes=128)
            if behaviour == "huge frame":  # a header that claims 4 GiB, then a trickle
                writer.write(b"\x00" + (4 << 30).to_bytes(8, "big") + b"x" * 1024)
                await writer.drain()
                # Held open, as a real attacker would: a stream closed at once may lose
                # what was written before the fetcher reads it, and end in a plain EOF.
                await asyncio.sleep(30)
            elif behaviour == "endless":
                while True:
                    writer.write(framing.frame_bytes(b"x" * CHUNK_BYTES))
                    await writer.drain()
            elif behaviour == "other bytes":
                writer.write(framing.frame_bytes(b"not what was named"))
            elif behaviour == "silent":
                await asyncio.sleep(3600)
            await writer.drain()

    return serve


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("huge frame", "exceeds"),
        ("endless", "sent over"),
        ("other bytes", "not evidence"),
        ("silent", "TimeoutError"),
    ],
)
def test_a_hostile_accuser_ends_the_fetch_within_bounds(
    peers, behaviour: str, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop, judge, accusers, _ = peers
    # The bound the fetch enforces, made small so that the endless stream meets it soon.
    monkeypatch.setattr(evidence_exchange, "MAX_EVIDENCE_BYTES", 4 * CHUNK_BYTES)
    accuser = accusers[behaviour].peer_id.to_base58()
    with pytest.raises(EvidenceFetchError, match=reason):
        loop.run(fetch_evidence(judge, accuser, "ab" * 32, timeout_s=3.0), timeout_s=30)


def test_the_store_answers_what_it_holds_and_nothing_else(peers) -> None:
    loop, judge, accusers, honest_name = peers
    honest = accusers["honest"]
    accuser = honest.peer_id.to_base58()
    fetched = loop.run(fetch_evidence(judge, accuser, honest_name, timeout_s=10.0), timeout_s=30)
    assert fetched == HONEST_BYTES
    with pytest.raises(EvidenceFetchError, match="not evidence"):
        loop.run(fetch_evidence(judge, accuser, "cd" * 32, timeout_s=10.0), timeout_s=30)

    async def oversized_request() -> bytes:
        _, reader, writer = await open_stream(judge, honest.peer_id, EVIDENCE_HANDLE)
        with contextlib.closing(writer):
            writer.write(framing.frame_bytes(b"x" * 4096))  # a request over 128 bytes
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 10)

    assert loop.run(oversized_request(), timeout_s=30) == b""  # closed, unanswered
