"""The peers this daemon has met, kept on disk, and finding them again.

A daemon bootstraps from its `--join` addresses only. When that peer restarts on another
port, or this daemon restarts as its own bootstrap node, nobody would dial anybody: the
swarm splits in two and stays split. So the daemon writes the addresses of the peers in
its routing table to `known_peers.json` in its data dir every few seconds, and when its
routing table is empty it dials the `--join` addresses and every known peer again.

The file is ours but its contents came from the network: it is read with a size cap, each
entry is checked as a `/p2p/` multiaddr, and at most `MAX_KNOWN_PEERS` are kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from volunteer.machine.atomic import write_file_atomic

logger = logging.getLogger(__name__)

MAX_KNOWN_PEERS = 64
MAX_ADDRS_PER_PEER = 4
MAX_FILE_BYTES = 256 << 10
DIAL_TIMEOUT_S = 5.0


def peer_of(address: str) -> PeerID | None:
    """The peer id a `/p2p/` multiaddr names; None for anything else."""
    try:
        return PeerID.from_base58(Multiaddr(address)["p2p"])
    except Exception:  # multiaddr raises several unrelated types for bad text
        return None


def load(path: Path) -> list[str]:
    """The known peers' addresses; an unreadable or malformed file is an empty list."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            logger.warning("ignoring %s: larger than %d bytes", path, MAX_FILE_BYTES)
            return []
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        logger.warning("ignoring %s: %s", path, exc)
        return []
    if not isinstance(entries, list):
        return []
    valid = [e for e in entries if isinstance(e, str) and peer_of(e) is not None]
    return valid[: MAX_KNOWN_PEERS * MAX_ADDRS_PER_PEER]


def save(path: Path, addresses: Iterable[str]) -> None:
    """Writes the addresses (deduplicated, in order) atomically."""
    unique = list(dict.fromkeys(addresses))[: MAX_KNOWN_PEERS * MAX_ADDRS_PER_PEER]
    write_file_atomic(path, json.dumps(unique, indent=0).encode())


async def connected_addresses(p2p: P2P, node: DHTNode) -> list[str]:
    """`/p2p/` addresses of the routing table's peers that p2pd is connected to now (a
    peer that vanished stays in the routing table until a request to it fails)."""
    routed = set(node.protocol.routing_table.peer_id_to_uid)
    addresses = []
    for info in await p2p.list_peers():
        if info.peer_id in routed and len(addresses) < MAX_KNOWN_PEERS * MAX_ADDRS_PER_PEER:
            suffix = f"/p2p/{info.peer_id.to_base58()}"
            addresses += [f"{addr}{suffix}" for addr in info.addrs[:MAX_ADDRS_PER_PEER]]
    return addresses


async def redial(p2p: P2P, node: DHTNode, addresses: Iterable[str]) -> int:
    """Dials each peer at its addresses and adds those that answer a DHT ping to the
    routing table; returns how many answered."""
    by_peer: dict[PeerID, list[Multiaddr]] = {}
    for address in addresses:
        peer = peer_of(address)
        if peer is not None and peer != p2p.peer_id:
            suffix = Multiaddr(f"/p2p/{peer.to_base58()}")
            by_peer.setdefault(peer, []).append(Multiaddr(address).decapsulate(suffix))
    answers = await asyncio.gather(*(_dial(p2p, node, p, a) for p, a in by_peer.items()))
    return sum(answers)


async def _dial(p2p: P2P, node: DHTNode, peer: PeerID, addrs: list[Multiaddr]) -> bool:
    try:
        # hivemind's P2P offers no public way to dial a known address; its client does.
        await asyncio.wait_for(p2p._client.connect(peer, addrs), DIAL_TIMEOUT_S)
        node_id = await asyncio.wait_for(
            node.protocol.call_ping(peer, validate=False, strict=False), DIAL_TIMEOUT_S
        )
    except Exception as exc:  # a dead or hostile peer: any failure means "not now"
        logger.debug("peer %s did not answer: %s", peer, exc)
        return False
    return node_id is not None
