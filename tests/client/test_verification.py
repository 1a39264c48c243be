"""Checked inference over real block servers on loopback, one of them a drill that answers
wrong: the session's outputs stay those of the blocks run locally, the cheat is banned on
its first checked step, and honest servers of other thread counts are never found wrong."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hivemind.p2p import P2P
from volunteer.models.model import BlockSpan
from volunteer.scheduler.routing import Backoff, ServerCandidate
from volunteer.scheduler.verification import Mode

from tests.client.decoding import assert_close, decode_cuts, local_outputs, route_session
from tests.server import LoopThread, hidden_states, random_span, sub_span, tiny_config
from volunteer.client.inference import SessionFailedError, SwarmInferenceSession
from volunteer.client.verification import Verifier, computation_opener
from volunteer.faults import parse_faults
from volunteer.server.drill import Drill
from volunteer.server.handler import BlockHandler
from volunteer.trust.reputation import Reputation

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
MAX_LENGTH = 48
TIMEOUT_S = 20.0


@dataclasses.dataclass
class Swarm:
    loop: LoopThread
    full: BlockSpan
    client: P2P
    servers: dict[str, tuple[P2P, BlockHandler, ServerCandidate]]

    def peer(self, name: str) -> str:
        return self.servers[name][2].peer_id

    def session(
        self, names: list[str], mode: Mode, *, local: bool = True
    ) -> tuple[SwarmInferenceSession, Verifier]:
        """A session over the named servers, checked as `mode` says; with `local`, the
        client computes blocks itself as the checks' last resort."""
        candidates = [self.servers[name][2] for name in names]

        async def open_shadow(start: int, end: int, avoid: frozenset[str]) -> Any:
            others = [c for c in candidates if c.peer_id not in avoid]
            shadow = route_session(
                self.client, others, Backoff(), max_length=MAX_LENGTH, timeout_s=TIMEOUT_S
            )
            await shadow.open(start, end)
            return shadow

        async def local_span(start: int, end: int) -> BlockSpan:
            return sub_span(self.full, start, end)

        verifier = Verifier(
            mode=mode,
            reputation=Reputation(),
            open_computation=computation_opener(
                open_shadow,
                local_span if local else None,
                no_route=(SessionFailedError,),
                batch_size=1,
                max_length=MAX_LENGTH,
            ),
            rng=random.Random(0),
        )
        session = route_session(
            self.client,
            candidates,
            Backoff(base_s=60.0),
            max_length=MAX_LENGTH,
            timeout_s=TIMEOUT_S,
            verifier=verifier,
        )
        return session, verifier

    def decode(
        self, session: SwarmInferenceSession, steps: int, *, right_from: int = 0
    ) -> list[torch.Tensor]:
        """A prefill of 5 positions then single steps, checked against the blocks run
        locally from step `right_from` on; the session's outputs."""
        hidden = hidden_states(1, 5 + steps, seed=7)
        cuts = decode_cuts(5, 5 + steps)

        async def run() -> list[torch.Tensor]:
            await session.open(0, self.full.config.num_layers)
            outputs, start = [], 0
            try:
                for end in cuts:
                    outputs.append(await session.step(hidden[:, start:end], start))
                    start = end
            finally:
                await session.close()
            return outputs

        outputs = self.loop.run(run(), timeout_s=300)
        expected = local_outputs(self.full, hidden, cuts, MAX_LENGTH)
        assert_close(outputs[right_from:], expected[right_from:])
        return outputs


SPECS = {
    # name: (start, end, throughput, faults, threads); the higher throughput is routed first
    "front": (0, 2, 1.0, "", 1),
    "cheat": (2, 4, 100.0, "perturb:1.0:0.05", 1),
    "honest": (2, 4, 10.0, "", 2),
    "zeros": (2, 4, 5.0, "constant", 1),
    "flaky": (2, 4, 200.0, "perturb:0.2:0.05", 1),
    "stale": (2, 4, 300.0, "stale", 1),
}


async def _start(full: BlockSpan) -> tuple[P2P, dict]:
    servers: dict[str, tuple[P2P, BlockHandler, ServerCandidate]] = {}
    for name, (start, end, throughput, faults, threads) in SPECS.items():
        known = [a for p2p, _, _ in servers.values() for a in await p2p.get_visible_maddrs()]
        p2p = await P2P.create(host_maddrs=LOOPBACK, initial_peers=known)
        handler = await BlockHandler.create(
            p2p=p2p,
            span=sub_span(full, start, end),
            model_name="tiny",
            cache_tokens=1024,
            max_batch=1,
            max_chunk=16,
            throughput=throughput,
            threads=threads,
        )
        if faults:
            handler.drill = Drill(parse_faults(faults), seed=1)
        candidate = ServerCandidate(p2p.peer_id.to_base58(), start, end, throughput)
        servers[name] = (p2p, handler, candidate)
    known = [a for p2p, _, _ in servers.values() for a in await p2p.get_visible_maddrs()]
    return await P2P.create(host_maddrs=LOOPBACK, initial_peers=known), servers


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    loop = LoopThread()
    full = random_span(tiny_config(), seed=3)
    client, servers = loop.run(_start(full), timeout_s=120)
    try:
        yield Swarm(loop=loop, full=full, client=client, servers=servers)
    finally:

        async def stop() -> None:
            for p2p, handler, _ in servers.values():
                await handler.shutdown()
                await p2p.shutdown()
            await client.shutdown()

        loop.run(stop(), timeout_s=120)
        loop.close()


def test_with_every_step_checked_a_cheat_is_banned_and_the_outputs_stay_right(
    swarm: Swarm,
) -> None:
    session, verifier = swarm.session(["front", "cheat", "honest"], "all")
    swarm.decode(session, steps=12)
    assert verifier.reputation.is_banned(swarm.peer("cheat"))
    assert "wrong output on blocks 2:4" in verifier.reputation.of(swarm.peer("cheat")).ban_reason
    assert verifier.wrong == 1 and verifier.unresolved == 0
    assert verifier.reputation.of(swarm.peer("honest")).passed >= 12
    assert not verifier.reputation.is_banned(swarm.peer("honest"))


def test_a_cheating_shadow_is_caught_by_the_third_computation(swarm: Swarm) -> None:
    # The honest server is routed (it is the faster), the zeros server shadows it, and
    # this process decides.
    session, verifier = swarm.session(["front", "honest", "zeros"], "all")
    swarm.decode(session, steps=4)
    assert verifier.reputation.is_banned(swarm.peer("zeros"))
    assert not verifier.reputation.is_banned(swarm.peer("honest"))
    assert "as a shadow" in verifier.reputation.of(swarm.peer("zeros")).ban_reason


def test_honest_servers_of_other_thread_counts_are_never_found_wrong(swarm: Swarm) -> None:
    session, verifier = swarm.session(["front", "honest"], "all")
    swarm.decode(session, steps=30)
    assert verifier.checked >= 2 * 31  # both hops, each step (this process checks them)
    assert (verifier.wrong, verifier.unresolved) == (0, 0)
    assert not verifier.reputation.banned()


def test_without_a_third_computation_nobody_is_banned(swarm: Swarm) -> None:
    session, verifier = swarm.session(["front", "cheat", "honest"], "all", local=False)
    # Each disagreement, undecided, costs the server its place in the route: with the
    # cheat and the honest server both set aside, no route is left.
    with pytest.raises(SessionFailedError):
        swarm.decode(session, steps=3)
    assert not verifier.reputation.banned()
    assert verifier.unresolved >= 1


def test_verification_off_checks_nothing(swarm: Swarm) -> None:
    session, verifier = swarm.session(["front", "honest"], "off")
    swarm.decode(session, steps=3)
    assert verifier.checked == 0


def test_a_stale_server_is_banned_as_fast(swarm: Swarm) -> None:
    session, verifier = swarm.session(["front", "stale", "honest"], "all")
    swarm.decode(session, steps=6)
    assert verifier.reputation.is_banned(swarm.peer("stale"))


def test_sampled_checks_catch_a_server_wrong_on_a_fifth_of_its_steps(swarm: Swarm) -> None:
    session, verifier = swarm.session(["front", "flaky", "honest"], "sample")
    # Unchecked steps are not verified: only the steps once the cheat is out must be right.
    outputs = swarm.decode(session, steps=40, right_from=30)
    assert len(outputs) == 41
    assert verifier.reputation.is_banned(swarm.peer("flaky"))
    assert not verifier.reputation.is_banned(swarm.peer("honest"))
    assert verifier.checked < 2 * 41  # a share of the steps, not all of them
