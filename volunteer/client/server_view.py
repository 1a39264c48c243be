"""The servers a client may route through, and the speed it counts each of them at.

Two checks on what records say, before any route is planned: only servers announcing
the client's own weights (`ServerInfo.weights_sha256`) are kept, so that no route mixes
in another model published under the same name; and each is given the speed the client
measured of it, or else its claim as a prior, capped, on probation
(`volunteer.scheduler.claims`).
"""

from __future__ import annotations

import logging
from typing import Literal

from volunteer.client.measurements import PeerMeasurements
from volunteer.models.config import ModelConfig
from volunteer.scheduler.claims import (
    DRAWN_PROBATION_FACTOR,
    PROBATION_FACTOR,
    SpeedEvidence,
    block_flops_per_token,
    plausible_throughput,
    routing_speeds,
)
from volunteer.scheduler.routing import ServerCandidate
from volunteer.swarm.records import ServerInfo, ServerState, SwarmSnapshot

logger = logging.getLogger(__name__)

LEAVING_SLOWDOWN = 100.0
"""A LEAVING server (handing its blocks over before it stops) counts this many times
slower: routes take it only where no other server holds its blocks."""
MAX_NOTED_PEERS = 1024
"""Peers left out for their weights that are remembered, so each is logged once."""

Work = Literal["decode", "forward"]
"""What the route is for: inference steps, or forward/backward calls."""


class ServerView:
    """Routing's view of the servers of one model (see the module docstring).

    Args:
        model: the model's name in the swarm (for log lines).
        weights_hash: the client's own weights' hash; None routes through any server of
            the model's name (tools and tests that run no model ends).
        weights_format: the form servers must hold the weights in (`ServerInfo.dtype`,
            a `WeightFormat` label): the client's checks recompute in that form. None:
            any (where every server holds one form, as in tests of tiny swarms).
        config: the model's config, for the plausible bound (None: no bound).
        measurements: what the client measured of each server.
    """

    def __init__(
        self,
        *,
        model: str,
        weights_hash: str | None,
        config: ModelConfig | None,
        measurements: PeerMeasurements,
        weights_format: str | None = None,
    ) -> None:
        self._model = model
        self._weights_hash = weights_hash
        self.weights_format = weights_format
        self._block_flops = None if config is None else _block_flops(config)
        self._measurements = measurements
        self._noted: set[str] = set()

    def routable(self, snapshot: SwarmSnapshot | None) -> dict[str, ServerInfo]:
        """Peer id -> record of the online (or leaving) servers serving our weights."""
        if snapshot is None:
            return {}
        online = {
            peer_id: info
            for peer_id, info in snapshot.spans().items()
            if info.state in (ServerState.ONLINE, ServerState.LEAVING)
        }
        ours, form = self._weights_hash, self.weights_format
        if ours is None and form is None:
            return online
        kept = {}
        for peer_id, info in online.items():
            if ours in (None, info.weights_sha256) and form in (None, info.dtype):
                kept[peer_id] = info
            elif peer_id not in self._noted:
                if len(self._noted) >= MAX_NOTED_PEERS:
                    self._noted.clear()
                self._noted.add(peer_id)
                logger.info(
                    "not routing through %s: it serves other weights under the name %s "
                    "(%s in %s, ours %s in %s)",
                    peer_id, self._model, (info.weights_sha256 or "no hash")[:12], info.dtype,
                    (ours or "any")[:12], form or "any form",
                )  # fmt: skip
        return kept

    def candidates(
        self, snapshot: SwarmSnapshot | None, *, kind: Work, on_probation: bool
    ) -> list[ServerCandidate]:
        """The routable servers, each at the speed routing counts for `kind` of work,
        with their measured round trips."""
        servers = self.routable(snapshot)
        measure = self._measurements
        measured = measure.decode_speed if kind == "decode" else measure.forward_speed
        speeds = routing_speeds(
            (
                SpeedEvidence(
                    peer_id=peer_id,
                    claimed=info.throughput,
                    bound=plausible_throughput(self._block_flops, info.device_class),
                    measured=measured(peer_id),
                )
                for peer_id, info in servers.items()
            ),
            on_probation=on_probation,
            # Inference takes the fastest route; forward/backward draws by speed.
            probation_factor=PROBATION_FACTOR if kind == "decode" else DRAWN_PROBATION_FACTOR,
        )
        return [
            ServerCandidate(
                peer_id=peer_id,
                start=info.start,
                end=info.end,
                throughput=speeds[peer_id] / _slowdown(info),
                rtt_s=measure.rtt_s(peer_id),
            )
            for peer_id, info in servers.items()
        ]


def _slowdown(info: ServerInfo) -> float:
    return LEAVING_SLOWDOWN if info.state is ServerState.LEAVING else 1.0


def _block_flops(config: ModelConfig) -> float:
    return block_flops_per_token(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
    )
