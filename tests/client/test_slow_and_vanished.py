"""A slow server is waited for; a vanished one is left within seconds, not at the step timeout.

Both are real block servers on 127.0.0.1. The vanished one runs in a process group of
its own (Python and its p2p daemon) that the test stops with SIGSTOP mid-session: its
connections stay open and silent, as when a host loses power, so nothing but the
client's keepalive can tell. The slow one computes each prefill for seconds on its
compute thread, as a big prompt on a weak machine does: it answers pings meanwhile, and
its steps must not be cut.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import torch
from hivemind.p2p import P2P
from volunteer.models.model import BlockSpan
from volunteer.scheduler.routing import Backoff, RouteHop, ServerCandidate

from tests.client.decoding import assert_close, decode_cuts, local_outputs, route_session
from tests.server import LoopThread, hidden_states, random_span, start_route_servers, tiny_config
from volunteer.client.inference import SwarmInferenceSession
from volunteer.client.keepalive import Keepalive
from volunteer.client.remote_span import KEEPALIVE
from volunteer.server.handler import BlockHandler

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
MAX_LENGTH = 16
PREFILL = 5
TOTAL = 10
STEP_TIMEOUT_S = 120.0
"""Far past what any step here takes: only the keepalive may end the stopped one's."""
DETECTED_S = 30.0
"""The stopped server's step must fail over within this: the keepalive gives up after
`KEEPALIVE.after_s + KEEPALIVE.timeout_s`, well under a quarter of STEP_TIMEOUT_S."""
START_S = 120.0
"""How long the server process may take to import torch and hivemind and start serving."""
SLOW_PREFILL_S = 1.5
SLOW_KEEPALIVE = Keepalive(after_s=0.1, timeout_s=1.0)
"""Pings many times during each slow prefill."""


def _cuts() -> list[int]:
    return decode_cuts(PREFILL, TOTAL)


def _session(
    client: P2P, candidates: list[ServerCandidate], backoff: Backoff, keepalive: Keepalive
) -> SwarmInferenceSession:
    return route_session(
        client,
        candidates,
        backoff,
        max_length=MAX_LENGTH,
        timeout_s=STEP_TIMEOUT_S,
        keepalive=keepalive,
    )


def _read_line(stream: IO[bytes], timeout_s: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout_s)
    return stream.readline() if ready else b""


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    try:
        yield loop
    finally:
        loop.close()


def test_a_stopped_server_is_left_within_seconds_and_the_output_is_the_same(
    loop: LoopThread,
) -> None:
    full = random_span(tiny_config())  # the same weights as the server process's
    servers, unused = loop.run(start_route_servers(full, [(0, 2), (2, 4)]))
    (replica, _), (second, _) = servers
    loop.run(unused.shutdown())
    known = [str(a) for p2p, _ in servers for a in loop.run(p2p.get_visible_maddrs())]
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.client.server_process", "0", "2", *known],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,  # its own group: the p2p daemon is stopped with it
        )
        client: P2P | None = None
        session: SwarmInferenceSession | None = None
        try:
            assert process.stdout is not None
            line = _read_line(process.stdout, START_S)
            errors.seek(0)
            assert line, f"the server process did not start: {errors.read()[-4000:]!r}"
            stopped = json.loads(line)
            client = loop.run(
                P2P.create(host_maddrs=LOOPBACK, initial_peers=known + stopped["maddrs"])
            )
            candidates = [
                ServerCandidate(stopped["peer_id"], 0, 2, 1000.0),  # preferred: served first
                ServerCandidate(replica.peer_id.to_base58(), 0, 2, 100.0),
                ServerCandidate(second.peer_id.to_base58(), 2, 4, 100.0),
            ]
            backoff = Backoff(base_s=600.0)
            session = _session(client, candidates, backoff, KEEPALIVE)
            hidden, cuts = hidden_states(1, TOTAL, seed=60), _cuts()
            loop.run(session.open(0, 4))
            assert session.route[0].peer_id == stopped["peer_id"]
            outputs, start = [], 0
            for index, end in enumerate(cuts):
                if index == 3:
                    os.killpg(process.pid, signal.SIGSTOP)
                    began = time.monotonic()
                step = session.step(hidden[:, start:end], start)
                outputs.append(loop.run(step, timeout_s=STEP_TIMEOUT_S + 10))
                if index == 3:
                    took = time.monotonic() - began
                    assert took < DETECTED_S, f"the stopped server was left after {took:.1f} s"
                start = end

            assert_close(outputs, local_outputs(full, hidden, _cuts(), MAX_LENGTH))
            assert len(session.route_history) == 2
            assert all(hop.peer_id != stopped["peer_id"] for hop in session.route_history[-1])
            assert stopped["peer_id"] in backoff.avoided(time.monotonic())
        finally:
            if session is not None:
                loop.run(session.close())
            os.killpg(process.pid, signal.SIGCONT)
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=30)  # reaps it and closes its pipes
            if client is not None:
                loop.run(client.shutdown())
            for p2p, handler in servers:
                loop.run(handler.shutdown())
                loop.run(p2p.shutdown())


class SlowPrefill(BlockSpan):
    """Blocks whose every prefill (a step of several positions) takes SLOW_PREFILL_S more,
    on the server's compute thread, as a long prompt does on a weak machine."""

    def forward(self, hidden: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if hidden.shape[1] > 1:
            time.sleep(SLOW_PREFILL_S)
        return super().forward(hidden, **kwargs)  # type: ignore[arg-type]


def _slow_span(full: BlockSpan, start: int, end: int) -> SlowPrefill:
    part = SlowPrefill(full.config, start, end)
    for index in range(start, end):
        part.blocks[index - start].load_state_dict(full.blocks[index].state_dict())
    part.forget_weights()
    return part.eval()


def test_a_slow_prefill_is_waited_for_while_the_server_answers_pings(loop: LoopThread) -> None:
    full = random_span(tiny_config())

    async def start() -> tuple[P2P, BlockHandler, P2P]:
        p2p = await P2P.create(host_maddrs=LOOPBACK)
        handler = await BlockHandler.create(
            p2p=p2p, span=_slow_span(full, 0, 4), model_name="tiny", cache_tokens=64, max_batch=1
        )
        client = await P2P.create(
            host_maddrs=LOOPBACK, initial_peers=await p2p.get_visible_maddrs()
        )
        return p2p, handler, client

    p2p, handler, client = loop.run(start())
    try:
        peer_id = p2p.peer_id.to_base58()
        backoff = Backoff(base_s=600.0)
        session = _session(client, [ServerCandidate(peer_id, 0, 4, 100.0)], backoff, SLOW_KEEPALIVE)
        hidden = hidden_states(1, TOTAL, seed=61)
        loop.run(session.open(0, 4))
        try:
            outputs, took, start = [], [], 0
            for end in _cuts():
                began = time.monotonic()
                outputs.append(loop.run(session.step(hidden[:, start:end], start), timeout_s=60))
                took.append(time.monotonic() - began)
                start = end
        finally:
            loop.run(session.close())

        assert_close(outputs, local_outputs(full, hidden, _cuts(), MAX_LENGTH))
        # The prefill outlasted many keepalive periods (each a ping), and was not cut.
        assert took[0] >= SLOW_PREFILL_S > 10 * SLOW_KEEPALIVE.after_s
        assert session.route_history == [[RouteHop(peer_id, 0, 4)]]
        assert backoff.avoided(time.monotonic()) == frozenset()
    finally:
        loop.run(handler.shutdown())
        loop.run(p2p.shutdown())
        loop.run(client.shutdown())
