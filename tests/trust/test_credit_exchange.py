"""The credit exchanges' bounds, over real p2p on loopback: a request over its bound, an
answer over the asker's, one request too many, and malformed draws get nothing."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from hivemind.p2p import P2P

from volunteer.trust.credit_exchange import (
    MAX_DRAWS,
    ExchangeError,
    ask,
    pack_draws,
    serve,
    unpack_draws,
)

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
HANDLE = "Test.credit"


async def _pair(answer_bytes: int, *, max_request_bytes: int, max_serving: int, delay_s: float):
    server = await P2P.create(host_maddrs=LOOPBACK)
    client = await P2P.create(
        host_maddrs=LOOPBACK, initial_peers=[str(a) for a in await server.get_visible_maddrs()]
    )

    async def answer(peer: str, body: bytes) -> bytes:
        await asyncio.sleep(delay_s)
        return b"a" * answer_bytes

    handler = serve(answer, max_request_bytes=max_request_bytes, max_serving=max_serving)
    await server.add_binary_stream_handler(HANDLE, handler)
    return server, client


def test_requests_and_answers_over_their_bounds_get_nothing() -> None:
    async def scenario() -> None:
        server, client = await _pair(100, max_request_bytes=64, max_serving=4, delay_s=0.0)
        try:
            peer = server.peer_id.to_base58()
            got = await ask(client, peer, HANDLE, b"x" * 64, max_answer_bytes=100, timeout_s=5)
            assert got == b"a" * 100
            with pytest.raises(ExchangeError):  # one byte over the request's bound
                await ask(client, peer, HANDLE, b"x" * 65, max_answer_bytes=100, timeout_s=5)
            with pytest.raises(ExchangeError):  # an answer over what the asker reads
                await ask(client, peer, HANDLE, b"x", max_answer_bytes=99, timeout_s=5)
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(scenario())


def test_requests_past_the_servings_at_once_are_closed_unanswered() -> None:
    async def scenario() -> None:
        server, client = await _pair(1, max_request_bytes=64, max_serving=1, delay_s=1.0)
        try:
            peer = server.peer_id.to_base58()
            asks = [
                ask(client, peer, HANDLE, b"x", max_answer_bytes=8, timeout_s=5) for _ in range(3)
            ]
            found = await asyncio.gather(*asks, return_exceptions=True)
            assert sum(isinstance(each, bytes) for each in found) == 1
            assert sum(isinstance(each, ExchangeError) for each in found) == 2
        finally:
            await client.shutdown()
            await server.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",
        msgpack.packb([b"r" * 32, [1, 1], [5]]),  # too few weights
        msgpack.packb([b"r" * 32, [1, 1, 1 << 40], [5]]),  # a weight past 32 bits
        msgpack.packb([b"r" * 32, [1, 1, 0], [-1]]),  # a negative point
        msgpack.packb([b"r" * 32, [1, 1, 0], list(range(MAX_DRAWS + 1))]),  # too many
        msgpack.packb([b"r" * 32, [1, 1, 0], ["5"]]),  # not integers
        msgpack.packb(["root", [1, 1, 0], [5]]),  # not bytes
    ],
)
def test_malformed_draws_are_refused(body: bytes) -> None:
    with pytest.raises(ExchangeError):
        unpack_draws(body)


def test_draws_round_trip() -> None:
    assert unpack_draws(pack_draws(b"r" * 32, (1, 1, 7), [0, 99])) == (
        b"r" * 32,
        (1, 1, 7),
        (0, 99),
    )
