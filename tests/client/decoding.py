"""Decoding through a `SwarmInferenceSession` on real servers, and the same steps run locally.

What the client tests share: the steps of a decode (a prefill, then one position at a
time), a session routed over a fixed list of candidates, the reference outputs of every
block run locally, and the comparison of the two.
"""

from __future__ import annotations

import time

import torch
from hivemind.p2p import P2P, PeerID
from volunteer.models.model import BlockSpan
from volunteer.scheduler.routing import Backoff, RouteHop, ServerCandidate, inference_route

from volunteer.client.inference import SwarmInferenceSession
from volunteer.client.keepalive import Keepalive
from volunteer.client.remote_span import KEEPALIVE, InferenceStream, RemoteSpan
from volunteer.client.swarm_client import RETRIABLE_ERRORS
from volunteer.client.verification import Verifier

ATOL = 1e-5


def decode_cuts(prefill: int, total: int) -> list[int]:
    """A prefill of `prefill` positions, then single-position decode steps up to `total`."""
    return [prefill, *range(prefill + 1, total + 1)]


def local_outputs(
    full: BlockSpan, hidden: torch.Tensor, cuts: list[int], max_length: int
) -> list[torch.Tensor]:
    """The outputs of the same steps through every block, with a local KV cache."""
    cache = full.allocate_cache(batch_size=hidden.shape[0], max_length=max_length)
    outputs, start = [], 0
    with torch.no_grad():
        for end in cuts:
            outputs.append(full(hidden[:, start:end], start_pos=start, cache=cache))
            start = end
    return outputs


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for index, (each_actual, each_expected) in enumerate(zip(actual, expected, strict=True)):
        assert each_actual.shape == each_expected.shape, index
        error = (each_actual - each_expected).abs().max().item()
        assert error <= ATOL, f"step {index}: max error {error}"


def route_session(
    client: P2P,
    candidates: list[ServerCandidate],
    backoff: Backoff,
    *,
    max_length: int,
    timeout_s: float,
    keepalive: Keepalive | None = KEEPALIVE,
    verifier: Verifier | None = None,
) -> SwarmInferenceSession:
    """A session of batch 1 whose routes use only `candidates` (read when it plans one);
    `timeout_s` bounds each opening and each step."""

    def plan_route(start: int, end: int, avoid: frozenset[str]) -> list[RouteHop]:
        return inference_route(candidates, start, end, avoid=avoid)

    async def open_stream(hop: RouteHop, next_step_id: int) -> InferenceStream:
        peer_id = PeerID.from_base58(hop.peer_id)
        remote = RemoteSpan(p2p=client, peer_id=peer_id, start=hop.start, end=hop.end)
        return await remote.open_inference(
            max_length=max_length,
            batch_size=1,
            timeout_s=timeout_s,
            next_step_id=next_step_id,
            keepalive=keepalive,
        )

    return SwarmInferenceSession(
        plan_route=plan_route,
        open_stream=open_stream,
        retriable=RETRIABLE_ERRORS,
        backoff=backoff,
        clock=time.monotonic,
        step_timeout_s=timeout_s,
        verifier=verifier,
    )
