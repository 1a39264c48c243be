"""How a refused stream ends, over real sockets: the peer always gets the reason; a peer
that ends its side is let go at once, one that holds the stream open waits out the
linger (it, not the server, pays for a flood of opens), and the lingering streams and
the bytes dropped from each are bounded; a peer kept out is held unread, its flood
stalled by flow control."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from hivemind.p2p import P2P
from hivemind.proto.p2pd_pb2 import RPCError

import volunteer.transport.framing as framing
from volunteer.server.caps import Refusals
from volunteer.transport.protocol import BadRequestError, BusyError

LINGER_S = 1.0
Peer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _refused(refusals: Refusals, peers: list[Peer]) -> list[float]:
    """Refuses one stream per peer, all at once; how long each refusal took."""
    took: list[float] = []

    async def refuse_one(peer: Peer) -> None:
        server_side, client_side = await _stream_pair()
        began = time.monotonic()
        talking = asyncio.ensure_future(peer(*client_side))
        await refusals.refuse(*server_side, BusyError("server holds 1 sessions, its most"))
        took.append(time.monotonic() - began)
        await asyncio.wait_for(talking, 10)

    await asyncio.wait_for(asyncio.gather(*(refuse_one(peer) for peer in peers)), 30)
    return took


async def _stream_pair() -> tuple[tuple, tuple]:
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result((reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client_side = await asyncio.open_connection("127.0.0.1", port)
    server_side = await asyncio.wait_for(accepted, 10)
    server.close()
    return server_side, client_side


async def _reason(reader: asyncio.StreamReader) -> str:
    marker, body = await framing.read_frame(reader, max_bytes=1 << 16)
    assert marker == P2P.ERROR_MARKER
    return RPCError.FromString(body).message


async def _reads_and_ends(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    assert (await _reason(reader)).startswith("busy:")
    writer.close()


async def _holds_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    assert (await _reason(reader)).startswith("busy:")
    assert await reader.read() == b""  # the server, not this peer, ends the stream
    writer.close()


def _keeps_writing(sent: list[int]) -> Peer:
    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                writer.write(b"\0" * (1 << 14))
                await writer.drain()
                sent[0] += 1 << 14
        except (ConnectionError, OSError):
            pass  # cut off: what the server wants
        writer.close()

    return peer


def test_a_peer_that_reads_the_reason_and_ends_is_let_go_at_once() -> None:
    refusals = Refusals(max_drop_bytes=1 << 20, linger_s=LINGER_S)
    took = asyncio.run(_refused(refusals, [_reads_and_ends] * 3))
    assert max(took) < LINGER_S / 2
    assert refusals.lingering == 0


def test_a_peer_that_holds_a_refused_stream_open_waits_out_the_linger() -> None:
    refusals = Refusals(max_drop_bytes=1 << 20, linger_s=LINGER_S)
    took = asyncio.run(_refused(refusals, [_holds_open] * 3))
    assert min(took) >= LINGER_S * 0.9
    assert refusals.lingering == 0


def test_past_the_most_lingering_a_refused_stream_is_closed_once_answered() -> None:
    refusals = Refusals(max_drop_bytes=1 << 20, linger_s=LINGER_S, max_lingering=2)
    took = sorted(asyncio.run(_refused(refusals, [_holds_open] * 5)))
    # Two linger; the other three get the reason and the end at once.
    assert took[2] < LINGER_S / 2
    assert took[3] >= LINGER_S * 0.9


def test_a_peer_writing_into_a_refused_stream_is_cut_off_after_one_message() -> None:
    drop_bytes = 1 << 18
    refusals = Refusals(max_drop_bytes=drop_bytes, linger_s=10.0)
    sent = [0]
    took = asyncio.run(_refused(refusals, [_keeps_writing(sent)]))
    assert took[0] < 5.0  # cut off long before the linger ends
    # What the peer got through is what the server dropped plus the sockets' buffers.
    assert drop_bytes <= sent[0] < drop_bytes + (16 << 20)


async def _held_unread(refusals: Refusals, count: int, write_s: float) -> list[tuple[float, int]]:
    """`count` peers, each refused with `hold_unread` and writing without pause for
    `write_s` (or until cut off): how long each refusal took, and what each got through."""

    async def one() -> tuple[float, int]:
        server_side, (reader, writer) = await _stream_pair()
        sent = 0

        async def flood() -> None:
            nonlocal sent
            assert (await _reason(reader)).startswith("bad request:")
            with contextlib.suppress(ConnectionError, OSError):
                while True:
                    writer.write(b"\0" * (1 << 14))
                    await writer.drain()
                    sent += 1 << 14

        began = time.monotonic()
        flooding = asyncio.ensure_future(asyncio.wait_for(flood(), write_s))
        await refusals.hold_unread(server_side[1], BadRequestError("kept out for 10 s"))
        took = time.monotonic() - began
        with contextlib.suppress(asyncio.TimeoutError):
            await flooding
        writer.close()
        return took, sent

    return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 30)


def test_a_peer_kept_out_is_held_unread_and_its_flood_stalls() -> None:
    refusals = Refusals(max_drop_bytes=1 << 20, linger_s=LINGER_S, max_held_unread=2)
    results = sorted(asyncio.run(_held_unread(refusals, 3, write_s=LINGER_S * 3)))
    # Past `max_held_unread` a stream is closed at once; the others are held the linger.
    assert results[0][0] < LINGER_S / 2
    assert all(took >= LINGER_S * 0.9 for took, _ in results[1:])
    # Held streams are not read: a flood gets no further than the sockets' buffers.
    assert all(sent < 16 << 20 for _, sent in results[1:])
    assert refusals.held_unread == 0
