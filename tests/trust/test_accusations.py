"""Accusations in the DHT: each peer publishes its own under its signed subkey, any peer
reads them all with their accusers, nobody writes another's, and malformed ones are
dropped; the evidence store keeps a bounded number of the latest."""

from __future__ import annotations

import asyncio
import time

import pytest
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from pydantic import ValidationError

from tests.swarm.dht_helpers import two_nodes
from volunteer.swarm.dht_records import owner_marker, peer_id_from_owner
from volunteer.trust.accusations import (
    MAX_PER_ACCUSER,
    Accusation,
    accusations_key,
    publish_on_node,
    read_on_node,
)
from volunteer.trust.evidence_exchange import EvidenceStore

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
TIMEOUT_S = 20.0


def _accusation(accused: str = "QmAccused", **changes: object) -> Accusation:
    fields = {"accused": accused, "start": 15, "end": 30, "reason": "wrong output",
              "filed_s": time.time(), "evidence": "ab" * 32}  # fmt: skip
    return Accusation(**{**fields, **changes})


def test_accusations_are_published_per_accuser_and_read_with_their_accuser() -> None:
    key_a, key_b = RSAPrivateKey(), RSAPrivateKey()

    async def scenario() -> None:
        async with two_nodes(key_a, key_b) as (node_a, node_b):
            owner_a, owner_b = owner_marker(key_a), owner_marker(key_b)
            mine = [_accusation(f"Qm{index}") for index in range(MAX_PER_ACCUSER + 2)]
            assert await publish_on_node(node_a, "m", mine, owner=owner_a, timeout_s=TIMEOUT_S)
            assert await publish_on_node(
                node_b, "m", [_accusation("QmOther")], owner=owner_b, timeout_s=TIMEOUT_S
            )
            # Nobody writes under another's subkey (the DHT checks the owner's signature).
            assert not await publish_on_node(
                node_b, "m", [_accusation("QmForged")], owner=owner_a, timeout_s=TIMEOUT_S
            )
            # Junk under one's own subkey is stored, then dropped by every reader.
            await node_b.store(
                accusations_key("m2"), [{"accused": 5}], get_dht_time() + 60, subkey=owner_b
            )
            read = await read_on_node(node_b, "m", timeout_s=TIMEOUT_S)
            assert read is not None
            by_accuser: dict[str, list[str]] = {}
            for accuser, accusation in read:
                by_accuser.setdefault(accuser, []).append(accusation.accused)
            a, b = peer_id_from_owner(owner_a), peer_id_from_owner(owner_b)
            # Only the latest MAX_PER_ACCUSER are kept.
            expected_a = [f"Qm{index}" for index in range(2, MAX_PER_ACCUSER + 2)]
            assert by_accuser == {a: expected_a, b: ["QmOther"]}
            assert await read_on_node(node_a, "m2", timeout_s=TIMEOUT_S) == []
            assert await read_on_node(node_a, "nothing-here", timeout_s=TIMEOUT_S) == []

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "changes",
    [{"evidence": "not hex"}, {"start": -1}, {"filed_s": float("nan")}, {"accused": ""}],
)
def test_malformed_accusations_are_refused(changes: dict) -> None:
    with pytest.raises(ValidationError):
        _accusation(**changes)


def test_an_accusations_reason_is_made_printable() -> None:
    assert _accusation(reason="\x1b[2Jwrong\u202e").reason == "[2Jwrong"


def test_the_evidence_store_keeps_the_latest_within_its_bounds() -> None:
    store = EvidenceStore(max_kept=2, max_bytes=100)
    names = [store.add(bytes([index]) * 30) for index in range(3)]
    assert store.get(names[0]) is None
    assert store.get(names[1]) == bytes([1]) * 30 and store.get(names[2]) == bytes([2]) * 30
    big = store.add(b"x" * 500)  # over the byte bound: the newest stays alone
    assert store.get(big) == b"x" * 500 and store.get(names[2]) is None
