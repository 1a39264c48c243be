"""Announcing and reading server records over real hivemind DHTs on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import keyring.backends.fail
import pytest

with warnings.catch_warnings():
    # hivemind's package import runs torch.jit.script, which torch deprecates; the suite
    # turns warnings into errors, so the import that triggers it is done here.
    warnings.simplefilter("ignore", DeprecationWarning)
    import hivemind

from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from tests.swarm.dht_helpers import (
    announce,
    announce_offline,
    make_dht,
    owned_main_loop,
    read_snapshot,
    reannounce,
    two_nodes,
)
from volunteer.daemon.identity import Identity, load_or_create_identity
from volunteer.paths import Paths
from volunteer.swarm.dht_records import (
    announce_on_node,
    owner_marker,
    peer_id_from_owner,
    read_snapshot_on_node,
)
from volunteer.swarm.records import RecordError, ServerInfo, ServerState, block_key

# hivemind's P2P.create finds its daemon binary with importlib.resources.path().
pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
TIMEOUT_S = 5.0


class Peer:
    """One DHT with the identity it signs with."""

    def __init__(self, dht: hivemind.DHT, identity: Identity) -> None:
        self.dht = dht
        self.identity = identity
        self.owner = owner_marker(identity.private_key)

    def maddrs(self) -> list[str]:
        return [str(addr) for addr in self.dht.get_visible_maddrs()]


def start_peer(root: Path, initial_peers: list[str]) -> Peer:
    paths = Paths.resolve(home=root, env={"VOLUNTEER_CACHE_DIR": str(root / "cache")})
    identity = load_or_create_identity(paths, keyring_backend=keyring.backends.fail.Keyring())
    dht = make_dht(
        identity_key=identity.private_key,
        identity_path=paths.runtime_dir / "p2p.key",
        initial_peers=initial_peers,
        host_maddrs=LOOPBACK,
    )
    return Peer(dht, identity)


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Peer, Peer]]:
    started: list[Peer] = []
    with owned_main_loop():
        try:
            started.append(start_peer(tmp_path_factory.mktemp("peer-a"), []))
            started.append(start_peer(tmp_path_factory.mktemp("peer-b"), started[0].maddrs()))
            yield started[0], started[1]
        finally:
            for peer in started:
                peer.dht.shutdown()


def info_for(model: str, start: int, end: int, **changes: object) -> ServerInfo:
    fields: dict[str, object] = {
        "state": ServerState.ONLINE,
        "start": start,
        "end": end,
        "throughput": 10.0,
        "dtype": "bfloat16",
        "cache_tokens_left": 2048,
        "version": "0.1.0",
        "model": model,
    }
    fields.update(changes)
    return ServerInfo.model_validate(fields)


def test_peer_id_comes_from_the_identity(peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    assert a.dht.peer_id.to_base58() == a.identity.peer_id
    assert peer_id_from_owner(a.owner) == a.identity.peer_id
    assert peer_id_from_owner(b.owner) == b.dht.peer_id.to_base58() != a.identity.peer_id


def test_a_announces_and_b_reads(peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    info = info_for("read-model", 1, 3, public_name="peer a")
    assert announce(a.dht, info, owner=a.owner, expiration_s=30, timeout_s=TIMEOUT_S)
    snap = read_snapshot(b.dht, "read-model", 4, timeout_s=TIMEOUT_S)
    assert snap.model == "read-model"
    served = [list(snap.servers_for_block(i)) for i in range(4)]
    assert served == [[], [a.identity.peer_id], [a.identity.peer_id], []]
    assert snap.spans() == {a.identity.peer_id: info}
    assert snap.block_throughput() == [0.0, 10.0, 10.0, 0.0]


def test_b_cannot_overwrite_the_record_of_a(peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    original = info_for("owned-model", 0, 2)
    assert announce(a.dht, original, owner=a.owner, expiration_s=30, timeout_s=TIMEOUT_S)
    forged = info_for("owned-model", 0, 2, state=ServerState.OFFLINE, throughput=0.0)
    # B's DHT has no key for A's marker, so its write goes out unsigned and is refused.
    assert not announce(b.dht, forged, owner=a.owner, expiration_s=60, timeout_s=TIMEOUT_S)
    later = get_dht_time() + 60
    assert not b.dht.store(block_key("owned-model", 0), forged.to_wire(), later, subkey=a.owner)
    for reader in (a, b):
        snap = read_snapshot(reader.dht, "owned-model", 2, timeout_s=TIMEOUT_S)
        assert snap.spans() == {a.identity.peer_id: original}


def test_a_rogue_peer_without_validation_cannot_forge_records(
    peers: tuple[Peer, Peer],
) -> None:
    a, b = peers
    original = info_for("rogue-model", 0, 1)
    assert announce(a.dht, original, owner=a.owner, expiration_s=30, timeout_s=TIMEOUT_S)
    # The rogue runs hivemind with no validators: it keeps the forgery itself and offers it
    # to readers, whose validators must refuse it.
    rogue = hivemind.DHT(initial_peers=a.maddrs(), start=True, host_maddrs=LOOPBACK)
    try:
        forged = info_for("rogue-model", 0, 1, throughput=0.0).to_wire()
        rogue.store(block_key("rogue-model", 0), forged, get_dht_time() + 60, subkey=a.owner)
        for reader in (a, b):
            snap = read_snapshot(reader.dht, "rogue-model", 1, timeout_s=TIMEOUT_S)
            assert snap.spans() == {a.identity.peer_id: original}
    finally:
        rogue.shutdown()


def test_malformed_records_are_dropped_and_the_rest_kept(
    peers: tuple[Peer, Peer], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = peers
    good = info_for("mixed-model", 0, 3)
    assert announce(a.dht, good, owner=a.owner, expiration_s=30, timeout_s=TIMEOUT_S)
    later = get_dht_time() + 30
    key = block_key("mixed-model", 1)
    # Signed by B, so the DHT accepts them; our schema must not.
    assert b.dht.store(key, {"state": "online", "start": -4}, later, subkey=b.owner)
    assert b.dht.store(block_key("mixed-model", 2), b"\x00junk", later, subkey=b.owner)
    elsewhere = info_for("mixed-model", 5, 7).to_wire()
    assert b.dht.store(block_key("mixed-model", 0), elsewhere, later, subkey=b.owner)
    # An unprotected subkey names no owner: every honest node refuses to store it.
    assert not b.dht.store(key, good.to_wire(), later, subkey=b"someone")
    with caplog.at_level(logging.WARNING, logger="volunteer.swarm.dht_records"):
        snap = read_snapshot(a.dht, "mixed-model", 3, timeout_s=TIMEOUT_S)
    assert snap.spans() == {a.identity.peer_id: good}
    assert all(list(servers) == [a.identity.peer_id] for servers in snap.blocks)
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 3
    assert sum(b.identity.peer_id in line for line in dropped) == 3
    assert any("start" in line for line in dropped)
    assert any("does not contain block 0" in line for line in dropped)


def test_records_expire(peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    info = info_for("short-model", 0, 2)
    assert announce(a.dht, info, owner=a.owner, expiration_s=1.0, timeout_s=TIMEOUT_S)
    assert read_snapshot(b.dht, "short-model", 2, timeout_s=TIMEOUT_S).spans()
    time.sleep(1.2)
    for reader in (a, b):
        snap = read_snapshot(reader.dht, "short-model", 2, timeout_s=TIMEOUT_S)
        assert snap.spans() == {}


def test_offline_announce_and_reannounce(peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    info = info_for("leaving-model", 0, 2)
    assert reannounce(a.dht, info, owner=a.owner, period_s=10, timeout_s=TIMEOUT_S)
    assert read_snapshot(b.dht, "leaving-model", 2, timeout_s=TIMEOUT_S).block_throughput() == [
        10.0,
        10.0,
    ]
    assert announce_offline(a.dht, info, owner=a.owner, expiration_s=30, timeout_s=TIMEOUT_S)
    snap = read_snapshot(b.dht, "leaving-model", 2, timeout_s=TIMEOUT_S)
    assert snap.spans()[a.identity.peer_id].state is ServerState.OFFLINE
    assert snap.block_throughput() == [0.0, 0.0]


def test_bad_model_names_are_refused_before_the_network(peers: tuple[Peer, Peer]) -> None:
    a, _ = peers
    with pytest.raises(RecordError):
        read_snapshot(a.dht, "no spaces allowed", 2, timeout_s=TIMEOUT_S)


def test_node_coroutines_on_the_callers_loop() -> None:
    # The daemon runs DHTNode on its own loop instead of hivemind's DHT process.
    key_a, key_b = RSAPrivateKey(), RSAPrivateKey()

    async def scenario() -> None:
        async with two_nodes(key_a, key_b) as (node_a, node_b):
            info = info_for("node-model", 0, 2)
            owner = owner_marker(key_a)
            assert await announce_on_node(
                node_a, info, owner=owner, expiration_s=30, timeout_s=TIMEOUT_S
            )
            assert not await announce_on_node(
                node_b, info, owner=owner, expiration_s=60, timeout_s=TIMEOUT_S
            )
            snap = await read_snapshot_on_node(node_b, "node-model", 2, timeout_s=TIMEOUT_S)
            assert snap.spans() == {peer_id_from_owner(owner): info}
            # A server moving off block 0 marks just that block OFFLINE.
            offline = info.model_copy(update={"state": ServerState.OFFLINE})
            assert await announce_on_node(
                node_a, offline, owner=owner, expiration_s=30, timeout_s=TIMEOUT_S,
                blocks=range(0, 1),
            )  # fmt: skip
            snap = await read_snapshot_on_node(node_b, "node-model", 2, timeout_s=TIMEOUT_S)
            me = peer_id_from_owner(owner)
            assert snap.servers_for_block(0)[me].state is ServerState.OFFLINE
            assert snap.servers_for_block(1)[me].state is ServerState.ONLINE
            with pytest.raises(ValueError, match="not all inside"):
                await announce_on_node(
                    node_a, info, owner=owner, expiration_s=30, timeout_s=TIMEOUT_S,
                    blocks=range(1, 3),
                )  # fmt: skip

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "subkey",
    [b"[owner:ssh-rsa AAAAnotakey]", b"plain", "[owner:x]", b"[owner:ssh-rsa AAA][owner:x]"],
)
def test_peer_id_from_owner_rejects_junk(subkey: object) -> None:
    with pytest.raises(RecordError):
        peer_id_from_owner(subkey)
