"""A whole training swarm in one process, on loopback: a driver and stage peers, each
on a hivemind P2P daemon of its own, talking over real streams. For drills, benchmarks
and tests; a real swarm runs one peer per daemon (`volunteer train`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import torch
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey

from volunteer.faults import parse_faults
from volunteer.models.model import ModelEnds
from volunteer.swarm.dht_records import encode_p2p_identity
from volunteer.training.attack_drill import AttackDrill
from volunteer.training.driver import Driver
from volunteer.training.job import TrainingJob
from volunteer.training.peer import Accuse, SpanFor, TrainingPeer
from volunteer.transport.commitment import PeerSigner

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@dataclasses.dataclass
class LoopbackSwarm:
    driver: Driver
    peers: list[TrainingPeer]
    p2ps: list[P2P]

    def peer(self, stage: int, index: int) -> TrainingPeer:
        """The `index`-th peer (in start order) now in `stage`."""
        return [peer for peer in self.peers if peer.stage == stage][index]

    async def kill(self, peer: TrainingPeer) -> None:
        """The peer's process dies: its daemon goes, nothing is said."""
        await peer.p2p.shutdown()

    async def close(self) -> None:
        for peer in self.peers:
            if peer.p2p.is_alive:
                await peer.stop()
        for p2p in self.p2ps:
            if p2p.is_alive:
                await p2p.shutdown()


async def signed_p2p(**options: object) -> tuple[P2P, PeerSigner]:
    """A P2P daemon on loopback whose peer id is a fresh RSA key's, and its signer (a
    stage peer signs its shares with the key of its peer id)."""
    key = RSAPrivateKey()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "identity.key"
        path.write_bytes(encode_p2p_identity(key))
        # A fresh key is nobody's: no need to ask the swarm whether it is taken.
        p2p = await P2P.create(
            host_maddrs=LOOPBACK, identity_path=str(path), check_if_identity_free=False,
            **options,
        )  # fmt: skip
    return p2p, PeerSigner(key)


async def start_loopback_swarm(
    job: TrainingJob,
    data: torch.Tensor,
    *,
    span_for: SpanFor,
    ends: ModelEnds,
    stages: list[int],
    faults: dict[int, str] | None = None,
    on_accuse: Accuse | None = None,
    **driver_options: object,
) -> LoopbackSwarm:
    """A driver and one peer per entry of `stages` (the stage it starts in); `faults`
    gives some peers (by index) `VOLUNTEER_FAULTS` training attacks; `on_accuse` takes
    the validators' accusations."""
    p2ps = [await P2P.create(host_maddrs=LOOPBACK)]
    signers = []
    try:
        for _ in stages:
            known = [addr for p2p in p2ps for addr in await p2p.get_visible_maddrs()]
            p2p, signer = await signed_p2p(initial_peers=known)
            p2ps.append(p2p)
            signers.append(signer)
        driver_id = p2ps[0].peer_id.to_base58()
        peers = []
        for index, (stage, p2p) in enumerate(zip(stages, p2ps[1:], strict=True)):
            attacks = parse_faults((faults or {}).get(index, "")).training_attacks()
            peer = TrainingPeer(
                p2p=p2p,
                job=job,
                stage=stage,
                span_for=span_for,
                ends=ends,
                drivers=frozenset({driver_id}),
                signer=signers[index],
                drill=AttackDrill(attacks, seed=index),
                on_accuse=on_accuse,
            )
            await peer.start()
            peers.append(peer)
    except BaseException:
        for p2p in p2ps:
            await p2p.shutdown()
        raise
    members = {peer.peer_id: peer.stage for peer in peers}
    driver = Driver(p2p=p2ps[0], job=job, data=data, members=members, **driver_options)
    return LoopbackSwarm(driver, peers, p2ps)
