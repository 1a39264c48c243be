"""A stage peer's side of the step's exchange (`TrainingPeer`'s `gather` and `share`
ops): it sends its share, with its signed claim (`volunteer.training.claims`), to every
member of its stage and takes theirs, each checked before it is kept (size, finite,
one per peer and round, current step, a claim its sender signed for exactly this
share, computed with this stage's weights: the driver syncs a peer whose weights
differ after an apply, so a validator always holds the weights a claim names).

A mixin of `TrainingPeer`, which owns the state these methods use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from typing import Any

import torch
from hivemind.p2p import P2P

from volunteer.training import wire
from volunteer.training.attack_drill import AttackDrill
from volunteer.training.calls import MAX_ROUNDS, TrainingCallError, call
from volunteer.training.claims import ClaimLog, ShareClaim, SignedClaim, sign_claim
from volunteer.training.job import TrainingJob
from volunteer.training.stage import StageTrainer
from volunteer.transport.commitment import CommitmentError, PeerSigner, tensor_digest

MAX_SHARES = 64
"""Shares kept per round (a stage's members; a bound on what strangers can make us hold)."""
MAX_WAIT_S = 120.0

logger = logging.getLogger(__name__)


class Refused(ValueError):
    """A call this peer does not take (a stranger's driver op, another step)."""


class Exchange:
    """The exchange half of `TrainingPeer` (see the module)."""

    p2p: P2P
    peer_id: str
    job: TrainingJob
    stage: int
    size: int
    trainer: StageTrainer
    _signer: PeerSigner
    _drill: AttackDrill
    _claim_log: ClaimLog
    _shares: dict[int, dict[str, torch.Tensor]]
    _claims: dict[int, dict[str, SignedClaim]]
    _refused: dict[int, set[str]]
    _arrived: asyncio.Condition
    _roster: dict[str, int]
    # Also the peer's: _at_step, _run, weights.

    async def _op_gather(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        step = self._at_step(header)
        round_ = wire.field(header, "round", int, low=0)
        senders = peer_list(header, "senders")
        members = peer_list(header, "members")
        wait_s = min(wire.field(header, "wait_s", float, low=0.0), MAX_WAIT_S)
        deadline = asyncio.get_running_loop().time() + wait_s
        shares = self._shares.setdefault(round_, {})
        if self.peer_id in senders:
            if not self.trainer.samples:
                raise Refused("this peer ran no microbatch in this step")
            own = (await self._run(self.trainer.gradient)).float()
            if self._drill.waits_for_honest():
                others = [p for p in senders if p != self.peer_id]
                await self._wait_for(round_, others, deadline - wait_s / 2)
            honest = [shares[p] for p in senders if p in shares and p != self.peer_id]
            sent = self._drill.share(own, honest, len(senders)) if self._drill else own
            signed = await self._run(lambda: self._sign(step, round_, sent))
            shares[self.peer_id] = sent
            self._claims.setdefault(round_, {})[self.peer_id] = signed
            head = {"op": "share", "step": step, "round": round_, **signed.to_header()}
            message = wire.pack(head, [sent])
            await asyncio.gather(
                *(
                    self._send(member, message, deadline)
                    for member in members
                    if member != self.peer_id
                )
            )
        await self._wait_for(round_, senders, deadline)
        return {"shares": {p: digest(shares[p]) for p in senders if p in shares}}, []

    def _sign(self, step: int, round_: int, share: torch.Tensor) -> SignedClaim:
        claim = ShareClaim(
            peer=self.peer_id,
            job=self.job.job_id,
            stage=self.stage,
            step=step,
            round=round_,
            weights=self.weights(),
            share=tensor_digest(share),
            works=tuple(self._claim_log.works),
            issued_s=time.time(),
        )
        return sign_claim(self._signer, claim)

    async def _send(self, member: str, message: bytes, deadline: float) -> None:
        left = deadline - asyncio.get_running_loop().time()
        try:
            header, tensors = wire.unpack(message)
            await call(
                self.p2p, member, header, tensors, timeout_s=max(left, 0.1), max_answer_bytes=4096
            )
        except TrainingCallError as exc:  # the member is down or late: the driver sees it
            logger.info("share not delivered: %s", exc)

    async def _wait_for(self, round_: int, senders: list[str], deadline: float) -> None:
        shares = self._shares.setdefault(round_, {})
        refused = self._refused.setdefault(round_, set())
        left = deadline - asyncio.get_running_loop().time()
        async with self._arrived:
            with contextlib.suppress(asyncio.TimeoutError):  # who is missing is the answer
                await asyncio.wait_for(
                    self._arrived.wait_for(
                        lambda: all(p in shares or p in refused for p in senders)
                    ),
                    max(left, 0.0),
                )

    async def _op_share(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        step = self._at_step(header)
        if self._roster.get(peer) != self.stage:
            raise Refused("shares come from this stage's peers only")
        round_ = wire.field(header, "round", int, low=0)
        if round_ >= MAX_ROUNDS:
            raise Refused(f"a step has at most {MAX_ROUNDS} rounds")
        (share,) = count(tensors, 1)
        if share.dtype != torch.float32 or share.shape != (self.size,):
            raise Refused(f"a share is {self.size} float32 numbers")
        shares = self._shares.setdefault(round_, {})
        if peer in shares:
            raise Refused("one share per peer and round")
        if len(shares) >= MAX_SHARES:
            raise Refused("too many shares in this round")
        try:
            signed = SignedClaim.from_header(header)
            claim = await asyncio.to_thread(signed.check)
            shared = await asyncio.to_thread(tensor_digest, share)
        except CommitmentError as exc:
            raise Refused(str(exc)) from None
        named = (claim.peer, claim.job, claim.stage, claim.step, claim.round, claim.share)
        if named != (peer, self.job.job_id, self.stage, step, round_, shared):
            raise Refused("the share's claim is not of this share from its sender")
        if claim.weights != await self._run(self.weights):
            # Else a validator could not show a stranger the weights it was computed with.
            # Its sender is answered: nobody waits for a share that will not count.
            async with self._arrived:
                self._refused.setdefault(round_, set()).add(peer)
                self._arrived.notify_all()
            raise Refused("the share's claim names other weights than this stage's")
        async with self._arrived:
            if peer in shares:
                raise Refused("one share per peer and round")
            shares[peer] = share
            self._claims.setdefault(round_, {})[peer] = signed
            self._arrived.notify_all()
        return {}, []


def count(tensors: list[torch.Tensor], many: int) -> list[torch.Tensor]:
    if len(tensors) != many:
        raise Refused(f"expected {many} tensors, got {len(tensors)}")
    return tensors


def peer_list(header: dict[str, Any], name: str) -> list[str]:
    peers = header.get(name)
    if (
        not isinstance(peers, list)
        or len(peers) > MAX_SHARES
        or not all(isinstance(p, str) for p in peers)
    ):
        raise Refused(f"{name}: at most {MAX_SHARES} peer ids")
    return peers


def digest(share: torch.Tensor) -> str:
    return hashlib.sha256(share.numpy().tobytes()).hexdigest()[:32]
