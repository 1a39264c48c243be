"""A stage peer (`volunteer.training.peer`) against hostile callers on loopback: a
stranger cannot drive it, and shares that are not shares are refused while the peer
keeps training for its driver."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.p2p import P2P

from tests.server import sub_span
from tests.training.swarm_helpers import tiny_data, tiny_job, tiny_model
from volunteer.training.calls import FENCED, TrainingCallError, call
from volunteer.training.claims import ShareClaim, WorkClaim, sign_claim, weights_digest
from volunteer.training.driver import Driver
from volunteer.training.job import Aggregation
from volunteer.training.loopback import LOOPBACK, signed_p2p
from volunteer.training.peer import TrainingPeer
from volunteer.transport.commitment import tensor_digest

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated")


async def _refused(p2p: P2P, peer: TrainingPeer, header: dict, tensors: list) -> str:
    with pytest.raises(TrainingCallError) as caught:
        await call(p2p, peer.peer_id, header, tensors, timeout_s=10, max_answer_bytes=1 << 20)
    return str(caught.value)


def test_strangers_cannot_drive_and_bad_shares_are_refused() -> None:
    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=12, sequence=8)
    job = tiny_job(data, aggregation=Aggregation(kind="mean"))

    async def run() -> None:
        driver = await P2P.create(host_maddrs=LOOPBACK)
        maddrs = await driver.get_visible_maddrs()
        host, signer = await signed_p2p(initial_peers=maddrs)
        stranger, stranger_signer = await signed_p2p(initial_peers=maddrs)
        await stranger.get_visible_maddrs()
        peer = TrainingPeer(
            p2p=host,
            job=job,
            stage=1,
            span_for=lambda a, b: sub_span(full, a, b),
            ends=ends,
            drivers=frozenset({driver.peer_id.to_base58()}),
            signer=signer,
        )
        await peer.start()
        try:
            hidden = torch.randn(2, 8, ends.config.hidden_size)
            labels = data[:2, 1:]
            step = {"step": 0, "key": "0.0"}
            assert "driver only" in await _refused(
                stranger, peer, {"op": "loss", **step}, [hidden, labels]
            )
            assert "unknown op" in await _refused(stranger, peer, {"op": "explode"}, [])
            share = {"op": "share", "step": 0, "round": 0}
            full_share = [torch.zeros(peer.size)]
            assert "this stage's peers only" in await _refused(stranger, peer, share, full_share)
            assert "the job's peers only" in await _refused(stranger, peer, {"op": "state"}, [])
            # The driver names the stranger a peer of stage 1: now its shares are read,
            # and checked.
            stranger_id = stranger.peer_id.to_base58()
            roster = {"op": "roster", "members": {stranger_id: 1}}
            assert "driver only" in await _refused(stranger, peer, roster, [])
            await call(driver, peer.peer_id, roster, timeout_s=10, max_answer_bytes=4096)
            assert "float32 numbers" in await _refused(stranger, peer, share, [torch.zeros(3)])
            assert "at step 0, not 5" in await _refused(
                stranger, peer, {**share, "step": 5}, full_share
            )
            assert "at most 8 rounds" in await _refused(
                stranger, peer, {**share, "round": 8}, full_share
            )
            # A share travels with a claim its sender signed for exactly that share.
            assert "signed claim" in await _refused(stranger, peer, share, full_share)
            claim = ShareClaim(
                peer=stranger_id, job=job.job_id, stage=1, step=0, round=0,
                weights=weights_digest(peer.trainer.params), share=tensor_digest(full_share[0]),
                works=(WorkClaim(given=bytes(32), second=bytes(32)),), issued_s=time.time(),
            )  # fmt: skip
            signed = sign_claim(stranger_signer, claim).to_header()
            forged = sign_claim(signer, claim).to_header()  # another key than the sender's
            assert "peer id" in await _refused(stranger, peer, {**share, **forged}, full_share)
            other = [torch.ones(peer.size)]
            assert "not of this share" in await _refused(stranger, peer, {**share, **signed}, other)
            elsewhere = sign_claim(stranger_signer, claim.model_copy(update={"weights": bytes(32)}))
            assert "other weights" in await _refused(
                stranger, peer, {**share, **elsewhere.to_header()}, full_share
            )
            later = sign_claim(stranger_signer, claim.model_copy(update={"round": 1}))
            assert "not of this share" in await _refused(
                stranger, peer, {**share, **later.to_header()}, full_share
            )
            await call(
                stranger, peer.peer_id, {**share, **signed}, full_share, timeout_s=10,
                max_answer_bytes=4096,
            )  # fmt: skip
            assert "one share per peer" in await _refused(
                stranger, peer, {**share, **signed}, full_share
            )
            assert len(peer._shares[0]) == 1
            bad_roster = {"op": "roster", "members": {stranger_id: 7}}
            assert "with their stage" in await _refused(driver, peer, bad_roster, [])
            # Its driver still trains it, and a bad label is refused with the reason.
            bad = labels.clone()
            bad[0, 0] = 10_000
            assert "token ids below" in await _refused(
                driver, peer, {"op": "loss", **step}, [hidden, bad]
            )
            answer, (grad,) = await call(
                driver,
                peer.peer_id,
                {"op": "loss", **step},
                [hidden, labels],
                timeout_s=10,
                max_answer_bytes=1 << 20,
            )
            assert answer["loss"] > 0 and grad.shape == hidden.shape
        finally:
            await peer.stop()
            for p2p in (stranger, host, driver):
                await p2p.shutdown()

    asyncio.run(run())


def test_a_stage_state_moves_to_another_peer_whole() -> None:
    """What `sync` hands over: weights and AdamW moments, after steps were taken."""
    from volunteer.training.stage import StageTrainer

    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=12, sequence=8)
    job = tiny_job(data, aggregation=Aggregation(kind="mean"))
    source = StageTrainer(sub_span(full, 0, 2), job.optimizer)
    for step in range(2):
        hidden = ends.embed(data[:4, :-1]).detach()
        source.forward(str(step), hidden)
        source.backward(str(step), torch.randn_like(hidden))
        source.step(source.gradient())
    taker = StageTrainer(sub_span(full, 0, 2), job.optimizer)
    taker.load_state(source.state(), source.steps)
    assert taker.steps == 2
    for mine, theirs in zip(taker.state(), source.state(), strict=True):
        assert torch.equal(mine, theirs)
    hidden = torch.randn(2, 8, ends.config.hidden_size)
    assert torch.equal(taker.span(hidden), source.span(hidden))


def test_a_driver_another_took_over_from_is_refused() -> None:
    """Two drivers of a job at once (a backup took over from a driver that is not
    dead): the stage peer obeys the latest epoch, then the driver earlier in the job's
    list, and the one it refuses learns that it was outdriven."""
    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=12, sequence=8)

    async def run() -> None:
        first = await P2P.create(host_maddrs=LOOPBACK)
        maddrs = await first.get_visible_maddrs()
        second = await P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
        host, signer = await signed_p2p(initial_peers=maddrs)
        ids = (first.peer_id.to_base58(), second.peer_id.to_base58())
        job = tiny_job(data, aggregation=Aggregation(kind="mean"))
        job = job.model_copy(update={"drivers": ids})
        peer = TrainingPeer(
            p2p=host, job=job, stage=0, span_for=lambda a, b: sub_span(full, a, b), ends=ends,
            drivers=frozenset(ids), signer=signer,
        )  # fmt: skip
        await peer.start()

        async def info(p2p: P2P, epoch: object) -> None:
            header = {"op": "info", "epoch": epoch}
            await call(p2p, peer.peer_id, header, timeout_s=10, max_answer_bytes=4096)

        try:
            await info(first, 0)
            assert FENCED in await _refused(second, peer, {"op": "info", "epoch": 0}, [])
            await info(second, 1)  # the backup took over
            assert FENCED in await _refused(first, peer, {"op": "info", "epoch": 0}, [])
            for bad in ("1", -1, 2**40, 1.0):
                assert "epoch" in await _refused(first, peer, {"op": "info", "epoch": bad}, [])
            # A driver that is refused so knows it: its daemon gives way.
            behind = Driver(p2p=first, job=job, data=data, members={peer.peer_id: 0}, epoch=0)
            with pytest.raises(TrainingCallError):
                await behind._ask(peer.peer_id, {"op": "info"}, timeout_s=10, max_answer_bytes=4096)
            assert behind.outdriven
            await info(first, 1)  # at one epoch, the driver earlier in the list
            assert FENCED in await _refused(second, peer, {"op": "info", "epoch": 1}, [])
        finally:
            await peer.stop()
            for p2p in (host, second, first):
                await p2p.shutdown()

    asyncio.run(run())
