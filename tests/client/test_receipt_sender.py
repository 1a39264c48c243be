"""The client's receipts reach the server over p2p: one per inference hop, calls tallied
and receipted when the client closes, work found wrong receipted as failed (it earns
nothing), and nothing for the client's own server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey
from volunteer.scheduler.credit import counted
from volunteer.scheduler.routing import RouteHop

from volunteer.client.receipt_sender import HopWork, ReceiptSender
from volunteer.server.work_log import WorkLog
from volunteer.swarm.dht_records import encode_p2p_identity
from volunteer.transport.commitment import PeerSigner
from volunteer.trust.credit_exchange import RECEIPT_HANDLE, serve
from volunteer.trust.intake import take_receipt
from volunteer.trust.ledger import Ledger
from volunteer.trust.receipts import MAX_RECEIPT_BYTES

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@contextlib.asynccontextmanager
async def _peer(key: RSAPrivateKey, folder: Path, join: list[str]) -> AsyncIterator[P2P]:
    path = folder / f"{id(key)}.key"
    path.write_bytes(encode_p2p_identity(key))
    p2p = await P2P.create(host_maddrs=LOOPBACK, initial_peers=join, identity_path=str(path))
    try:
        yield p2p
    finally:
        await p2p.shutdown()


def test_receipts_for_hops_and_calls_reach_the_server_and_wrong_work_earns_nothing(
    tmp_path: Path,
) -> None:
    client_key, server_key = RSAPrivateKey(), RSAPrivateKey()
    client, server = PeerSigner(client_key), PeerSigner(server_key)
    ledger = Ledger(None, server=server.peer_id, model="m", params_per_block=10**6)
    log = WorkLog()
    refusals: list[str] = []

    async def answer(peer: str, body: bytes) -> bytes:
        reason = take_receipt(ledger, log.claim, peer=peer, body=body)
        refusals.extend([reason] if reason else [])
        return reason.encode()

    async def scenario() -> None:
        async with _peer(server_key, tmp_path, []) as server_p2p:
            maddrs = [str(a) for a in await server_p2p.get_visible_maddrs()]
            handler = serve(answer, max_request_bytes=MAX_RECEIPT_BYTES)
            await server_p2p.add_binary_stream_handler(RECEIPT_HANDLE, handler)
            async with _peer(client_key, tmp_path, maddrs) as client_p2p:
                banned: set[str] = set()
                sender = ReceiptSender(client_p2p, client, "m", is_banned=banned.__contains__)
                hop = RouteHop(server.peer_id, 0, 15)
                log.add(client.peer_id, "inference", "s1", 12)
                log.add(client.peer_id, "inference", "s2", 7)
                log.add(client.peer_id, "forward", "", 30)
                log.add(client.peer_id, "backward", "", 10)
                now = time.time()
                sender.hop_done(HopWork(server.peer_id, 0, 15, "s1", 12, now, checked=2))
                banned.add(server.peer_id)  # its steps, as a shadow say, were found wrong
                sender.hop_done(HopWork(server.peer_id, 0, 15, "s2", 7, now))
                sender.hop_done(HopWork(client.peer_id, 0, 15, "own", 5, now))  # ourselves
                for _ in range(2):
                    sender.call_done(hop, "forward", torch.zeros(3, 5, 8))
                sender.call_done(hop, "backward", torch.zeros(2, 5, 8))
                await sender.close()
                assert (sender.sent, sender.refused, sender.dropped) == (4, 0, 0)

    asyncio.run(scenario())
    assert refusals == []
    works = {(w.kind, w.tokens): w for w in ledger.works()}
    assert set(works) == {("inference", 12), ("inference", 7), ("forward", 30), ("backward", 10)}
    assert works[("inference", 12)].checked == 2 and works[("inference", 7)].failed == 1
    credit = {c.receipt_id: c.milli for c in counted(works.values(), server=server.peer_id,
                                                     params_per_block=10**6)}  # fmt: skip
    assert credit[works[("inference", 7)].receipt_id] == 0  # found wrong: nothing
    assert credit[works[("backward", 10)].receipt_id] == 2 * 10 * 15  # backward counts double
