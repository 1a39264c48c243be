"""The daemon's DHT: hivemind's P2P daemon and a DHT node in the daemon's own event loop.

hivemind's `DHT` class forks a process with its own loop; we build its parts
(`P2P.create` spawns the Go p2pd as a subprocess, `DHTNode.create` runs on our loop)
so the daemon keeps one loop and other services can use `p2p` and `node` directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from pathlib import Path
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from volunteer.control.messages import DHTStatus
from volunteer.daemon import known_peers
from volunteer.settings import Settings
from volunteer.swarm.dht_guard import guard_dht
from volunteer.swarm.dht_storage import bound_node_storage

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
"""Longest wait for p2pd to start and the DHT to bootstrap from `--join` peers."""
MAINTAIN_PERIOD_S = 5.0
"""How often the known peers are saved, or, with none in the routing table, dialled
again: a restarted bootstrap peer is found within a few of these."""


class DHTService:
    """Joins (or starts) the swarm's DHT.

    Args:
        settings: `join`, `new_swarm`, `host` and `port` are used.
        identity_path: hivemind private key file, so the peer id survives restarts; removed
            once p2pd has started. None gives a fresh peer id at each start.
        record_validator: signs this peer's records and checks others' (see
            `volunteer.swarm.dht_records.make_validator`); None stores unsigned records.
        known_peers_path: where the peers met are kept (`volunteer.daemon.known_peers`);
            None keeps none.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        identity_path: Path | None = None,
        record_validator: Any = None,
        known_peers_path: Path | None = None,
    ) -> None:
        self._settings = settings
        self._identity_path = identity_path
        self._record_validator = record_validator
        self._known_peers_path = known_peers_path
        self._p2p: P2P | None = None
        self._node: DHTNode | None = None
        self._multiaddrs: list[str] = []
        self._maintaining: asyncio.Task[None] | None = None
        self._has_had_peers = False
        self._is_partitioned = False

    @property
    def p2p(self) -> P2P:
        """The running P2P daemon (for services that register RPC handlers)."""
        if self._p2p is None:
            raise RuntimeError("DHTService is not started")
        return self._p2p

    @property
    def node(self) -> DHTNode:
        """The running DHT node (for services that store and read records)."""
        if self._node is None:
            raise RuntimeError("DHTService is not started")
        return self._node

    async def start(self) -> None:
        """Starts p2pd and the DHT node; bootstraps from the `join` peers."""
        await asyncio.wait_for(self._start(), timeout=START_TIMEOUT_S)

    async def _start(self) -> None:
        settings = self._settings
        initial_peers = [] if settings.is_new_swarm else list(settings.join)
        version = ipaddress.ip_address(settings.host).version
        is_loopback = ipaddress.ip_address(settings.host).is_loopback
        self._p2p = await P2P.create(
            initial_peers=initial_peers,
            host_maddrs=[f"/ip{version}/{settings.host}/tcp/{settings.port}"],
            identity_path=str(self._identity_path) if self._identity_path else None,
            # On loopback there is no NAT to map or probe; don't ask the router (UPnP).
            nat_port_map=not is_loopback,
            auto_nat=not is_loopback,
        )
        if self._identity_path is not None:
            # p2pd has read the key: a plaintext copy of it must not outlive that.
            self._identity_path.unlink(missing_ok=True)
        self._node = await DHTNode.create(
            p2p=self._p2p, initial_peers=initial_peers, record_validator=self._record_validator
        )
        # Strangers store records here; what we keep for them, and how fast, is capped.
        bound_node_storage(self._node)
        await guard_dht(self._node)
        self._multiaddrs = [str(addr) for addr in await self._p2p.get_visible_maddrs()]
        what = "started a new swarm" if settings.is_new_swarm else "joined the swarm"
        logger.info("DHT %s as %s; others join with %s", what, self.peer_id, self._multiaddrs)
        self._maintaining = asyncio.create_task(self._maintain_forever(), name="dht-peers")

    async def _maintain_forever(self) -> None:
        while True:
            try:
                await self._maintain()
            except Exception:  # a bad file or a failed dial must not end the loop
                logger.exception("keeping the known peers failed")
            await asyncio.sleep(MAINTAIN_PERIOD_S)

    async def _maintain(self) -> None:
        """Saves the connected peers of the routing table; with none, dials the known ones
        again (the `--join` addresses and those saved before)."""
        p2p, node, path = self.p2p, self.node, self._known_peers_path
        connected = await known_peers.connected_addresses(p2p, node)
        if connected:
            if self._is_partitioned:
                logger.info("reconnected to the swarm")
            self._has_had_peers, self._is_partitioned = True, False
            if path is not None:
                known_peers.save(path, connected)
            return
        targets = [*self._settings.join, *(known_peers.load(path) if path else [])]
        if self._has_had_peers and not self._is_partitioned:
            logger.warning("no peers left in the routing table: partitioned; redialling")
        self._is_partitioned = self._has_had_peers
        if targets:
            await known_peers.redial(p2p, node, targets)

    async def stop(self) -> None:
        """Leaves the DHT and stops p2pd."""
        if self._maintaining is not None:
            self._maintaining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintaining
        node, p2p = self._node, self._p2p
        self._node = self._p2p = None
        if node is not None:
            await node.shutdown()
        if p2p is not None:
            await p2p.shutdown()

    @property
    def peer_id(self) -> str | None:
        """This peer's id (base58), once started."""
        return self._p2p.peer_id.to_base58() if self._p2p is not None else None

    def status(self) -> DHTStatus:
        """This peer's id and addresses, and the other peers in its routing table."""
        peers = 0
        if self._node is not None:
            peers = len(self._node.protocol.routing_table.peer_id_to_uid)
        return DHTStatus(
            peer_id=self.peer_id,
            multiaddrs=list(self._multiaddrs),
            peers_seen=peers,
            new_swarm=self._settings.is_new_swarm,
            is_partitioned=self._is_partitioned,
        )
