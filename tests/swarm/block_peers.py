"""In-process block servers in one DHT, each built as the daemon builds its own: a P2P
identity and record signatures from one key, our record validator, bounded storage."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey

from tests.server import sub_span
from volunteer.server.handler import BlockHandler
from volunteer.swarm.dht_records import (
    announce_on_node,
    encode_p2p_identity,
    make_validator,
    owner_marker,
)
from volunteer.swarm.dht_storage import bound_node_storage
from volunteer.swarm.records import ServerInfo, ServerState
from volunteer.transport.commitment import PeerSigner

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@dataclasses.dataclass
class Peer:
    p2p: P2P
    node: DHTNode
    handler: BlockHandler
    owner: bytes

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id.to_base58()


async def start_peer(
    full: torch.nn.Module, start: int, end: int, initial_peers: list[str], *, model: str
) -> Peer:
    """Serves blocks [start, end) of `full` under `model`, joined to `initial_peers`."""
    key = RSAPrivateKey()
    with tempfile.TemporaryDirectory() as folder:
        identity = Path(folder) / "identity.key"
        identity.write_bytes(encode_p2p_identity(key))
        p2p = await P2P.create(
            host_maddrs=LOOPBACK, initial_peers=initial_peers, identity_path=str(identity)
        )
    node = await DHTNode.create(
        p2p=p2p, initial_peers=initial_peers, record_validator=make_validator(key)
    )
    bound_node_storage(node)
    handler = await BlockHandler.create(
        p2p=p2p, span=sub_span(full, start, end), model_name=model, cache_tokens=256
    )
    handler.signer = PeerSigner(key)
    return Peer(p2p, node, handler, owner_marker(key))


def server_info(
    start: int,
    end: int,
    *,
    model: str,
    throughput: float,
    weights: str | None,
    state: ServerState = ServerState.ONLINE,
    dtype: str = "fp32",
) -> ServerInfo:
    """A record of blocks [start, end) of `model`, as a CPU server of blocks held in
    `dtype` with 256 cache tokens left announces it (or as one that claims to be such a
    server)."""
    return ServerInfo(
        state=state,
        start=start,
        end=end,
        throughput=throughput,
        dtype=dtype,
        cache_tokens_left=256,
        version="0.1.0",
        model=model,
        weights_sha256=weights,
        device_class="cpu",
    )


async def stop_peers(peers: list[Peer]) -> None:
    for peer in peers:
        await peer.handler.shutdown()
        await peer.node.shutdown()
        await peer.p2p.shutdown()


async def start_announced(
    full: torch.nn.Module, spans: dict[str, tuple[int, int]], *, model: str
) -> dict[str, Peer]:
    """Servers of `full`'s blocks on 127.0.0.1, one per span, announced as online."""
    peers: dict[str, Peer] = {}
    maddrs: list[str] = []
    for name, (start, end) in spans.items():
        peers[name] = await start_peer(full, start, end, maddrs, model=model)
        if not maddrs:
            maddrs = [str(a) for a in await peers[name].p2p.get_visible_maddrs()]
    for peer in peers.values():
        info = ServerInfo(
            state=ServerState.ONLINE,
            start=peer.handler.span.start,
            end=peer.handler.span.end,
            throughput=100.0,
            dtype="float32",
            cache_tokens_left=256,
            version="0.1.0",
            model=model,
        )
        assert await announce_on_node(
            peer.node, info, owner=peer.owner, expiration_s=60, timeout_s=10
        )
    return peers
