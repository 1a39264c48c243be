"""Hostile records in the DHT: honest tiny-model servers on 127.0.0.1 announce, an attacker
running plain hivemind (no validator of ours) stores what it likes under their block keys,
and the honest records must survive in every honest read while sessions keep working.

Each attack runs after the previous ones, on one module-scoped swarm, so later checks also
show that the earlier attacks left nothing behind that breaks routing.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import hivemind

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from tests.server import LoopThread, hidden_states, random_span, tiny_config
from tests.swarm.block_peers import LOOPBACK, Peer, server_info, start_peer, stop_peers
from tests.swarm.dht_helpers import owned_main_loop
from volunteer.client.swarm_connection import SwarmConnection
from volunteer.swarm.dht_records import (
    announce_on_node,
    owner_marker,
    read_snapshot_on_node,
)
from volunteer.swarm.dht_validator import MAX_RECORD_BYTES, MAX_RECORD_LIFETIME_S
from volunteer.swarm.records import ServerInfo, ServerState, SwarmSnapshot, block_key

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

MODEL = "tiny-attacked"
NUM_BLOCKS = 4
TIMEOUT_S = 10.0
ATOL = 1e-5
HOUR_S = 3600.0
OURS = "a" * 64
"""The weights hash of the honest servers' (and the client's) model."""


@dataclasses.dataclass
class Swarm:
    loop: LoopThread
    full: torch.nn.Module
    honest: list[Peer]
    client: SwarmConnection
    attacker: hivemind.DHT
    attacker_key: RSAPrivateKey


async def _honest(full: torch.nn.Module, start: int, end: int, peers: list[str]) -> Peer:
    honest = await start_peer(full, start, end, peers, model=MODEL)
    info = _info(start, end, throughput=100.0)
    assert await announce_on_node(
        honest.node, info, owner=honest.owner, expiration_s=HOUR_S, timeout_s=TIMEOUT_S
    )
    return honest


def _info(
    start: int,
    end: int,
    *,
    throughput: float,
    weights: str | None = OURS,
    model: str = MODEL,
    state: ServerState = ServerState.ONLINE,
) -> ServerInfo:
    return server_info(start, end, model=model, throughput=throughput, weights=weights, state=state)


def _snapshot(loop: LoopThread, node: DHTNode, model: str) -> SwarmSnapshot:
    """What `node` reads of `model`'s servers now."""
    return loop.run(
        read_snapshot_on_node(node, model, NUM_BLOCKS, timeout_s=TIMEOUT_S),
        timeout_s=TIMEOUT_S + 5,
    )


def _announce_honest_as(swarm: Swarm, model: str) -> None:
    """The honest servers announce their blocks under `model` too."""
    for peer, (start, end) in zip(swarm.honest, ((0, 2), (2, 4)), strict=True):
        info = _info(start, end, throughput=100.0, model=model)
        stored = announce_on_node(
            peer.node, info, owner=peer.owner, expiration_s=HOUR_S, timeout_s=TIMEOUT_S
        )
        assert swarm.loop.run(stored, timeout_s=TIMEOUT_S + 5)


async def _start(full: torch.nn.Module) -> list[Peer]:
    first = await _honest(full, 0, 2, [])
    maddrs = [str(a) for a in await first.p2p.get_visible_maddrs()]
    return [first, await _honest(full, 2, 4, maddrs)]


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    loop = LoopThread()
    full = random_span(tiny_config(NUM_BLOCKS))
    honest = loop.run(_start(full), timeout_s=60)
    maddrs = [str(a) for a in loop.run(honest[0].p2p.get_visible_maddrs())]
    attacker_key = RSAPrivateKey()
    with owned_main_loop():
        # Plain hivemind: it signs its own marked subkeys and checks nothing of ours.
        attacker = hivemind.DHT(
            initial_peers=maddrs,
            start=True,
            host_maddrs=LOOPBACK,
            record_validators=[RSASignatureValidator(attacker_key)],
        )
        try:
            with SwarmConnection(maddrs) as client:
                yield Swarm(loop, full, honest, client, attacker, attacker_key)
        finally:
            attacker.shutdown()
            loop.run(stop_peers(honest))
            loop.close()


def _assert_honest_records_survive(swarm: Swarm) -> None:
    expected = {peer.peer_id for peer in swarm.honest}
    readers = [(swarm.loop, peer.node) for peer in swarm.honest]
    readers.append((swarm.client.loop_thread, swarm.client.node))
    for loop, node in readers:
        snapshot = _snapshot(loop, node, MODEL)
        assert set(snapshot.spans()) == expected
        assert snapshot.block_throughput() == [100.0] * NUM_BLOCKS


def _assert_sessions_work(swarm: Swarm) -> None:
    hidden = hidden_states(1, 5)
    cache = swarm.full.allocate_cache(batch_size=1, max_length=16)
    with torch.no_grad():
        expected = swarm.full(hidden, start_pos=0, cache=cache)
    # A fresh client reads the swarm now, not a view from before the attack.
    client = swarm.client.client(model=MODEL, num_blocks=NUM_BLOCKS, weights_hash=OURS)

    async def decode() -> torch.Tensor:
        session = await client.open_session(max_length=16)
        try:
            return await session.step(hidden, 0)
        finally:
            await session.close()

    got = swarm.client.loop_thread.run(decode(), timeout_s=60)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def _attacker_marker(swarm: Swarm) -> bytes:
    return owner_marker(swarm.attacker_key)


def test_the_honest_swarm_works_before_any_attack(swarm: Swarm) -> None:
    _assert_honest_records_survive(swarm)
    _assert_sessions_work(swarm)


def test_a_plain_value_does_not_wipe_the_block_keys(swarm: Swarm) -> None:
    later = get_dht_time() + HOUR_S
    for index in range(NUM_BLOCKS):
        swarm.attacker.store(block_key(MODEL, index), b"x", later)
    _assert_honest_records_survive(swarm)
    _assert_sessions_work(swarm)


def test_a_far_future_record_is_refused(swarm: Swarm) -> None:
    # Signed by the attacker, so plain hivemind takes it; it would never expire.
    forever = get_dht_time() + MAX_RECORD_LIFETIME_S + 10 * HOUR_S
    fake = _info(0, NUM_BLOCKS, throughput=1e6).to_wire()
    for index in range(NUM_BLOCKS):
        key = block_key(MODEL, index)
        swarm.attacker.store(key, fake, forever, subkey=_attacker_marker(swarm))
    _assert_honest_records_survive(swarm)
    _assert_sessions_work(swarm)


def test_an_oversized_record_is_refused(swarm: Swarm) -> None:
    # Unknown fields are ignored on read, so only the size cap keeps this one out.
    padded = {**_info(0, NUM_BLOCKS, throughput=1e6).to_wire(), "pad": "x" * MAX_RECORD_BYTES}
    later = get_dht_time() + HOUR_S
    for index in range(NUM_BLOCKS):
        swarm.attacker.store(block_key(MODEL, index), padded, later, subkey=_attacker_marker(swarm))
    _assert_honest_records_survive(swarm)
    _assert_sessions_work(swarm)


def test_a_flood_of_subkeys_is_refused(swarm: Swarm) -> None:
    # One key, many subkeys: hivemind signs any subkey that contains the marker.
    fake = _info(0, NUM_BLOCKS, throughput=1e6).to_wire()
    later = get_dht_time() + HOUR_S
    marker = _attacker_marker(swarm)
    for index in range(NUM_BLOCKS):
        key = block_key(MODEL, index)
        for i in range(50):
            swarm.attacker.store(key, fake, later, subkey=marker + b"#%d" % i, return_future=True)
            swarm.attacker.store(key, fake, later, subkey=b"unsigned-%d" % i, return_future=True)
        # The last one waited for: the attacker's process handles stores in order.
        swarm.attacker.store(key, fake, later, subkey=b"unsigned-last")
    _assert_honest_records_survive(swarm)
    _assert_sessions_work(swarm)


def test_fake_joining_records_do_not_steer_the_span_choice(swarm: Swarm) -> None:
    # Another model, so the earlier tests' swarm keeps only honest records.
    steer = "tiny-steer"
    first = swarm.honest[0]
    _announce_honest_as(swarm, steer)
    # Signed by the attacker, well-formed and in range: only their state gives them away.
    joining = _info(0, 2, throughput=1e9, model=steer, state=ServerState.JOINING)
    later = get_dht_time() + HOUR_S
    for index in range(2):
        key = block_key(steer, index)
        assert swarm.attacker.store(key, joining.to_wire(), later, subkey=_attacker_marker(swarm))
    snapshot = _snapshot(swarm.loop, first.node, steer)
    assert len(snapshot.spans()) == 3  # the fake records are read, and not counted
    assert snapshot.block_throughput() == [100.0] * NUM_BLOCKS
    assert snapshot.weakest_span(2) == (0, 2)


def test_records_of_other_weights_under_our_name_draw_no_route_and_no_placement(
    swarm: Swarm,
) -> None:
    # Another model published under this one's name: well-formed, signed, and claiming
    # to be the fastest server of all. Routed to, it would answer from other weights;
    # counted, it would steer servers away from the blocks it claims.
    forked = "tiny-forked"
    first, second = swarm.honest
    _announce_honest_as(swarm, forked)
    later = get_dht_time() + HOUR_S
    fake = _info(0, NUM_BLOCKS, throughput=1e6, weights="b" * 64, model=forked)
    for index in range(NUM_BLOCKS):
        key = block_key(forked, index)
        assert swarm.attacker.store(key, fake.to_wire(), later, subkey=_attacker_marker(swarm))
    snapshot = _snapshot(swarm.loop, first.node, forked)
    assert len(snapshot.spans()) == 3  # the forged record is read: valid as a record
    ours = snapshot.with_weights(OURS)
    assert set(ours.spans()) == {peer.peer_id for peer in swarm.honest}
    assert ours.block_throughput() == [100.0] * NUM_BLOCKS
    client = swarm.client.client(model=forked, num_blocks=NUM_BLOCKS, weights_hash=OURS)

    async def decode() -> list[list[str]]:
        session = await client.open_session(max_length=16)
        try:
            await session.step(hidden_states(1, 3), 0)
            return [[hop.peer_id for hop in route] for route in session.route_history]
        finally:
            await session.close()

    client.trial_share = 1.0  # even routes that try newcomers
    routes = swarm.client.loop_thread.run(decode(), timeout_s=60)
    assert routes == [[first.peer_id, second.peer_id]]  # no failover: never tried them
    assert {c.peer_id for c in client.candidates()} == set(ours.spans())
