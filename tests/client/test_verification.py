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
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey
from volunteer.models.model import BlockSpan
from volunteer.scheduler.routing import Backoff, ServerCandidate
from volunteer.scheduler.verification import Mode, check_share

from tests.client.decoding import assert_close, decode_cuts, local_outputs, route_session
from tests.server import (
    LoopThread,
    hidden_states,
    random_span,
    signing_p2p,
    sub_span,
    tiny_config,
)
from volunteer.client.inference import SessionFailedError, SwarmInferenceSession
from volunteer.client.remote_span import RemoteSpan
from volunteer.client.verification import Verifier, computation_opener, replay_steps
from volunteer.faults import parse_faults
from volunteer.server.drill import Drill
from volunteer.server.handler import BlockHandler
from volunteer.transport.commitment import PeerSigner
from volunteer.transport.protocol import BadReplyError
from volunteer.trust.evidence import Evidence, EvidenceError, is_wrong
from volunteer.trust.evidence_exchange import (
    EVIDENCE_HANDLE,
    EvidenceFetchError,
    EvidenceStore,
    fetch_evidence,
)
from volunteer.trust.reputation import Reputation
from volunteer.trust.tolerance import FLOAT32_TOLERANCE

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
        self,
        names: list[str],
        mode: Mode,
        *,
        local: bool = True,
        reputation: Reputation | None = None,
        rng: random.Random | None = None,
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
            reputation=reputation or Reputation(),
            open_computation=computation_opener(
                open_shadow,
                local_span if local else None,
                no_route=(SessionFailedError,),
                batch_size=1,
                max_length=MAX_LENGTH,
            ),
            rng=rng or random.Random(0),
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
        p2p, signer = await signing_p2p(host_maddrs=LOOPBACK, initial_peers=known)
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
        handler.signer = signer
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
    accused: list[tuple[str, Evidence]] = []
    verifier.accuse = lambda peer, evidence, reason: accused.append((peer, evidence))
    swarm.decode(session, steps=4)
    assert verifier.reputation.is_banned(swarm.peer("zeros"))
    assert not verifier.reputation.is_banned(swarm.peer("honest"))
    assert "as a shadow" in verifier.reputation.of(swarm.peer("zeros")).ban_reason
    # A shadow signs its steps as any server does: it is accused with its own evidence.
    ((peer, evidence),) = accused
    assert peer == swarm.peer("zeros") == evidence.checked_certificate().server
    assert swarm.loop.run(is_wrong(evidence, _replay_here(swarm), FLOAT32_TOLERANCE), 60)


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


def test_sampled_checks_shadow_a_newcomer_and_catch_it_wrong_on_a_fifth_of_its_steps(
    swarm: Swarm,
) -> None:
    session, verifier = swarm.session(["front", "flaky", "honest"], "sample")
    # A newcomer's hop is shadowed whole: the outputs are right from the first step on.
    outputs = swarm.decode(session, steps=40)
    assert len(outputs) == 41
    assert verifier.reputation.is_banned(swarm.peer("flaky"))
    assert not verifier.reputation.is_banned(swarm.peer("honest"))


def test_sampled_checks_shadow_few_sessions_of_servers_with_a_long_record(swarm: Swarm) -> None:
    reputation = Reputation()
    for name in ("front", "honest"):
        for _ in range(90):  # a long record: 1 hop in 10 is shadowed
            reputation.record_check(swarm.peer(name), passed=True)
    share = check_share(reputation.of(swarm.peer("front")).record, "sample")
    sessions, rng = 20, random.Random(5)
    # One draw per hop (2 per session), in order: how many hops the policy shadows.
    draws = random.Random(5)
    shadowed = sum(draws.random() < share for _ in range(2 * sessions))
    checked = 0
    for _ in range(sessions):
        session, verifier = swarm.session(
            ["front", "honest"], "sample", reputation=reputation, rng=rng
        )
        swarm.decode(session, steps=2)
        checked += verifier.checked
        assert verifier.checked in (0, 3, 6)  # a hop is shadowed whole, or not at all
    assert 0 < shadowed < sessions  # few hops: the seed shows some, as the share says
    assert checked == 3 * shadowed


def _replay_here(swarm: Swarm):
    """Recomputes evidence's steps on the blocks run in this process (the judge's own)."""

    async def replay(start: int, end: int, steps: list) -> torch.Tensor:
        return await replay_steps(sub_span(swarm.full, start, end), steps)

    return replay


def test_a_caught_cheat_leaves_evidence_that_a_stranger_checks_without_it(swarm: Swarm) -> None:
    # A cheat of its own, which goes offline once caught: the stranger who judges the
    # evidence cannot have asked it anything.
    async def start_cheat() -> tuple[P2P, BlockHandler]:
        known = [str(a) for a in await swarm.client.get_visible_maddrs()]
        p2p, signer = await signing_p2p(host_maddrs=LOOPBACK, initial_peers=known)
        handler = await BlockHandler.create(
            p2p=p2p, span=sub_span(swarm.full, 2, 4), model_name="tiny", cache_tokens=1024,
            max_batch=1, max_chunk=16,
        )  # fmt: skip
        handler.signer = signer
        handler.drill = Drill(parse_faults("perturb:1.0:0.05"), seed=2)
        return p2p, handler

    p2p, handler = swarm.loop.run(start_cheat(), timeout_s=60)
    cheat = p2p.peer_id.to_base58()
    swarm.servers["gone"] = (p2p, handler, ServerCandidate(cheat, 2, 4, 1000.0))
    try:
        session, verifier = swarm.session(["front", "gone", "honest"], "all")
        accused: list[tuple[str, Evidence, str]] = []
        verifier.accuse = lambda peer, evidence, reason: accused.append((peer, evidence, reason))
        swarm.decode(session, steps=3)
    finally:
        del swarm.servers["gone"]
        swarm.loop.run(handler.shutdown(), timeout_s=30)
        swarm.loop.run(p2p.shutdown(), timeout_s=30)
    assert [(peer, reason) for peer, _, reason in accused] == [
        (cheat, "wrong output on blocks 2:4 at position 0")
    ]
    raw = accused[0][1].to_bytes()

    async def judge() -> bool:
        # The accuser (this client) serves its evidence to a peer that knows only it.
        store = EvidenceStore()
        name = store.add(raw)
        await swarm.client.add_binary_stream_handler(EVIDENCE_HANDLE, store.serve)
        accuser = [str(a) for a in await swarm.client.get_visible_maddrs()]
        stranger = await P2P.create(host_maddrs=LOOPBACK, initial_peers=accuser)
        try:
            accuser_id = swarm.client.peer_id.to_base58()
            fetched = await fetch_evidence(stranger, accuser_id, name, timeout_s=TIMEOUT_S)
            with pytest.raises(EvidenceFetchError):
                await fetch_evidence(stranger, accuser_id, "0" * 64, timeout_s=TIMEOUT_S)
            evidence = Evidence.from_bytes(fetched)
            assert evidence.checked_certificate().server == cheat
            return await is_wrong(evidence, _replay_here(swarm), FLOAT32_TOLERANCE)
        finally:
            await stranger.shutdown()
            await swarm.client.remove_binary_stream_handler(EVIDENCE_HANDLE)

    assert swarm.loop.run(judge(), timeout_s=120)

    # Evidence with any step changed no longer holds: the chain is not the one signed.
    tampered = Evidence.from_bytes(raw)
    tampered.steps[0].hidden = tampered.steps[0].hidden + 1e-3
    with pytest.raises(EvidenceError, match="does not hold"):
        tampered.checked_certificate()
    with pytest.raises(EvidenceError):
        Evidence.from_bytes(raw[:-10])


def test_an_honest_servers_signed_steps_do_not_convict_it(swarm: Swarm) -> None:
    async def run() -> tuple[Evidence, Evidence]:
        logs = []
        for name in ("honest", "cheat"):
            peer = PeerID.from_base58(swarm.peer(name))
            remote = RemoteSpan(p2p=swarm.client, peer_id=peer, start=2, end=4)
            stream = await remote.open_inference(max_length=MAX_LENGTH, batch_size=1)
            hidden = hidden_states(1, 6, seed=11)
            await stream.step(hidden[:, :4], 0)
            await stream.step(hidden[:, 4:6], 4)
            await stream.step(hidden[:, 3:4], 3)  # a rewind is part of the signed history
            await stream.close()
            logs.append(stream.log.evidence())
        return logs[0], logs[1]

    honest, cheat = swarm.loop.run(run(), timeout_s=60)
    replay = _replay_here(swarm)
    honest = Evidence.from_bytes(honest.to_bytes())
    assert honest.checked_certificate().server == swarm.peer("honest")
    assert not swarm.loop.run(is_wrong(honest, replay, FLOAT32_TOLERANCE), timeout_s=60)
    assert swarm.loop.run(is_wrong(cheat, replay, FLOAT32_TOLERANCE), timeout_s=60)


def test_a_server_certifying_a_key_not_its_own_is_not_used(swarm: Swarm) -> None:
    _, handler, candidate = swarm.servers["zeros"]
    own = handler.signer
    handler.signer = PeerSigner(RSAPrivateKey())  # certificates that name another peer

    async def run() -> None:
        peer = PeerID.from_base58(candidate.peer_id)
        remote = RemoteSpan(p2p=swarm.client, peer_id=peer, start=2, end=4)
        with pytest.raises(BadReplyError, match=r"not its server's peer id|another server"):
            await remote.open_inference(max_length=MAX_LENGTH, batch_size=1)

    try:
        swarm.loop.run(run(), timeout_s=60)
    finally:
        handler.signer = own
