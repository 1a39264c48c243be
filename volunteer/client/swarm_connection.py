"""A client's own connection to a swarm, for `volunteer chat --swarm MULTIADDR`.

Runs hivemind's P2P daemon and a client-mode DHT node (it reads records but stores none
for others) on a background loop, so the chat can run without a local daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from volunteer.client.loop_thread import LoopThread
from volunteer.client.swarm_client import LocalBlocks, SwarmClient
from volunteer.models.config import ModelConfig
from volunteer.scheduler.verification import Mode
from volunteer.swarm.dht_records import make_validator
from volunteer.transport.protocol import PeerUnavailableError

CONNECT_TIMEOUT_S = 60.0
LISTEN_ON = ["/ip4/127.0.0.1/tcp/0"]
"""A client only dials out; it listens on loopback, reachable by nobody else."""


class SwarmConnection:
    """P2P + DHT node on a `LoopThread`; a context manager that tears both down."""

    def __init__(self, initial_peers: Sequence[str]) -> None:
        self.initial_peers = list(initial_peers)
        self.loop_thread = LoopThread(name="volunteer-swarm")
        self.p2p: P2P | None = None
        self.node: DHTNode | None = None
        self._clients: list[SwarmClient] = []

    def __enter__(self) -> SwarmConnection:
        try:
            self.loop_thread.run(self._connect(), timeout_s=CONNECT_TIMEOUT_S + 5)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.loop_thread.loop

    def client(
        self,
        *,
        model: str,
        num_blocks: int,
        weights_hash: str | None = None,
        weights_format: str | None = None,
        config: ModelConfig | None = None,
        verify: Mode = "off",
        local_blocks: LocalBlocks | None = None,
    ) -> SwarmClient:
        """A `SwarmClient` for `model` over this connection (use it on `loop`); see it for
        `weights_hash`, `weights_format`, `config`, `verify` and `local_blocks`."""
        assert self.p2p is not None and self.node is not None, "use inside `with`"
        client = SwarmClient(
            p2p=self.p2p,
            node=self.node,
            model=model,
            num_blocks=num_blocks,
            weights_hash=weights_hash,
            weights_format=weights_format,
            config=config,
            verify=verify,
            local_blocks=local_blocks,
        )
        self._clients.append(client)  # closed with the connection
        return client

    async def _connect(self) -> None:
        try:
            self.p2p = await asyncio.wait_for(
                P2P.create(initial_peers=self.initial_peers, host_maddrs=LISTEN_ON),
                CONNECT_TIMEOUT_S,
            )
            self.node = await asyncio.wait_for(
                DHTNode.create(
                    p2p=self.p2p,
                    initial_peers=self.initial_peers,
                    client_mode=True,
                    # Servers sign their records; without the validator a reader would
                    # take the signature for part of the value and fail to decode it,
                    # and would take a stranger's plain value over the servers' records.
                    record_validator=make_validator(),
                ),
                CONNECT_TIMEOUT_S,
            )
        except Exception as exc:  # timeouts, OSError, hivemind's P2PDaemonError (bad address)
            raise PeerUnavailableError(
                f"could not join the swarm at {', '.join(self.initial_peers)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def close(self) -> None:
        """Leaves the swarm and stops the loop (idempotent)."""
        if self.loop_thread.loop.is_closed():
            return
        try:
            self.loop_thread.run(self._disconnect(), timeout_s=15)
        finally:
            self.loop_thread.close()

    async def _disconnect(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.close()
        node, p2p = self.node, self.p2p
        self.node = self.p2p = None
        if node is not None:
            await node.shutdown()
        if p2p is not None:
            await p2p.shutdown()
