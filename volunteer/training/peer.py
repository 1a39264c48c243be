"""A stage peer on the network: one peer of one SWARM stage of a training job.

It answers the job's driver (`volunteer.training.driver`) on `TRAIN_HANDLE`:

- `forward`, `backward`, `loss`: a microbatch through this stage (the first embeds
  token ids, the last takes the targets and runs forward, loss and backward at once);
  `reset` forgets the step's sums (a banned peer of a later stage gave it gradients);
- `gather`: the step's exchange (`volunteer.training.exchange`): it sends its share
  (mean gradient of the microbatches it ran), with the claim it signs for it, to every
  member of its stage, waits for theirs until the deadline, and answers with a digest
  of each share that came (a late or silent peer's is missing);
- `verify`: as a validator, recomputes another peer's share and answers from the
  microbatches the driver logged and says how far each is from its own
  (`volunteer.training.judge`); a wrong one is also handed, as evidence a stranger can
  check (`volunteer.training.evidence`), to `on_accuse`, which publishes it;
- `apply`: aggregates the shares the driver kept (with the sample counts the driver
  counted, not what peers claim) and steps; a peer missing one of them skips the step
  and is told to `sync`;
- `sync`: loads a stage's state from a peer of it (after a missed step, or to move to
  another stage), and `state`: hands its own (its weights only, for the result).

Peers send each other only `share` (to their stage) and `state`, and only peers the
driver's last `roster` named; every other op is the driver's alone.
Torch runs on one worker thread per peer, so the network keeps flowing while it
computes. Every wait has a deadline; a share is checked (size, finite, one per peer and
round, current step, its sender's signed claim) before it is kept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

import torch
from hivemind.p2p import P2P

from volunteer.models.model import BlockSpan, ModelEnds
from volunteer.training import attacks, judge, wire
from volunteer.training.attack_drill import AttackDrill
from volunteer.training.calls import FENCED, TRAIN_HANDLE, TrainingCallError, call, refusal
from volunteer.training.claims import ClaimLog, SignedClaim, weights_digest
from volunteer.training.evidence import TrainingEvidence, from_verify, is_wrong
from volunteer.training.exchange import (
    MAX_SHARES,
    MAX_WAIT_S,
    Exchange,
    Refused,
    count,
)
from volunteer.training.job import TrainingJob
from volunteer.training.stage import StageError, StageTrainer, aggregate
from volunteer.transport.commitment import PeerSigner
from volunteer.transport.one_shot import serve

DRIVER_OPS = (
    "roster", "forward", "backward", "loss", "reset", "gather", "verify", "apply", "sync", "info"
)  # fmt: skip
MAX_MEMBERS = 4096
"""Peers of a job a roster may name."""

logger = logging.getLogger(__name__)

SpanFor = Callable[[int, int], BlockSpan]
"""The job's initial weights of blocks [start, end) (every peer builds the same)."""
Accuse = Callable[[str, TrainingEvidence, str], None]
"""Files an accusation of a peer with its evidence, for the whole swarm to judge."""


class TrainingPeer(Exchange):
    """One stage peer (module doc). `start` serves it on `p2p`; `stop` ends it."""

    def __init__(
        self,
        *,
        p2p: P2P,
        job: TrainingJob,
        stage: int,
        span_for: SpanFor,
        ends: ModelEnds,
        drivers: frozenset[str],
        signer: PeerSigner,
        drill: AttackDrill | None = None,
        on_pass: Callable[[str, int], None] | None = None,
        on_accuse: Accuse | None = None,
    ) -> None:
        self.p2p = p2p
        self.peer_id = p2p.peer_id.to_base58()
        if signer.peer_id != self.peer_id:
            raise ValueError("a training peer signs with the key of its own peer id")
        self._signer = signer
        self._on_accuse = on_accuse
        """Given the evidence of a peer this one, as a validator, found wrong."""
        self._claim_log = ClaimLog()
        self._claims: dict[int, dict[str, SignedClaim]] = {}
        """This step's signed claims of the shares, by round, then by sender."""
        self._refused: dict[int, set[str]] = {}
        """Senders whose share of this step a round refused for its weights."""
        self._weights_at: bytes | None = None
        """`weights_digest` of the stage's weights now (None: not computed since they
        last changed)."""
        self.job = job
        self._span_for = span_for
        self._ends = ends.eval()
        self._drivers = drivers
        self._fence = (0, -len(job.drivers))
        """(epoch, -rank in the job's drivers) of the latest driver obeyed (`_obey`)."""
        self._drill = drill or AttackDrill(())
        self._on_pass = on_pass
        """Told of each pass run for a driver (its peer id, positions): the daemon logs
        it for the driver's receipt (`volunteer.trust.intake`)."""
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stage")
        self._shares: dict[int, dict[str, torch.Tensor]] = {}
        """This step's shares by round, then by sender."""
        self._arrived = asyncio.Condition()
        self._roster: dict[str, int] = {}
        """The job's peers and their stages, as the driver last said: only they may send
        shares (to their stage) or ask for the state."""
        self._handing = asyncio.Semaphore(1)
        """One state handed over at a time: each is a copy of the stage's state."""
        self._join(stage)

    def _join(self, stage: int) -> None:
        self.stage = stage
        start, end = self.job.stages[stage]
        self.trainer = StageTrainer(
            self._span_for(start, end),
            self.job.optimizer,
            lora_rank=self.job.lora_rank or 0,
            seed=self.job.seed,
        )
        self.size = sum(param.numel() for param in self.trainer.params)
        self._next_step()

    def _next_step(self) -> None:
        self._weights_at = None
        self._shares.clear()
        self._refused.clear()
        self._claims.clear()
        self._claim_log.clear()
        self._drill.begin_step()

    @property
    def first(self) -> bool:
        return self.job.ends_of(self.stage)[0]

    @property
    def last(self) -> bool:
        return self.job.ends_of(self.stage)[1]

    @property
    def max_request_bytes(self) -> int:
        """A share, or a validator's worth of logged microbatches, with room to spare."""
        largest = max(end - start for start, end in self.job.stages)
        per_block = self.size // max(
            1, self.job.stages[self.stage][1] - self.job.stages[self.stage][0]
        )
        activations = self.job.batch_size * self.job.sequence_length * self._ends.config.hidden_size
        return 8 * (largest * per_block + 4 * activations) + (1 << 20)

    async def start(self) -> None:
        handler = serve(self._answer, max_request_bytes=self.max_request_bytes, max_serving=64)
        await self.p2p.add_binary_stream_handler(TRAIN_HANDLE, handler)
        if self._drill:
            logger.warning(
                "training peer %s commits drill attacks: %s", self.peer_id, self._drill.faults
            )

    async def stop(self) -> None:
        try:
            await self.p2p.remove_binary_stream_handler(TRAIN_HANDLE)
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    async def _answer(self, peer: str, body: bytes) -> bytes:
        op = "?"
        try:
            header, tensors = wire.unpack(body)
            op = wire.field(header, "op", str)
            if op in DRIVER_OPS:
                self._obey(peer, header)
            method = (
                getattr(self, f"_op_{op}", None) if op in (*DRIVER_OPS, "share", "state") else None
            )
            if method is None:
                raise Refused(f"unknown op {op[:40]!r}")
            answer, out = await method(peer, header, tensors)
            return wire.pack(answer, out)
        except (wire.WireError, StageError, Refused, TrainingCallError, ValueError) as exc:
            return refusal(str(exc))
        except RuntimeError as exc:  # torch's word for inputs it cannot take
            logger.info("a %s call failed here: %s", op, exc)
            return refusal(f"could not compute: {str(exc)[:200]}")

    def _obey(self, peer: str, header: dict[str, Any]) -> None:
        """Refuses a driver op from anyone but the job's drivers, and from a driver that
        another took over from (fencing): each call carries its driver's epoch (the
        job's takeovers), and this peer obeys the latest, then the driver earlier in
        the job's list; two drivers at once cannot both move it."""
        if peer not in self._drivers:
            raise Refused("it is for the job's driver only")
        epoch = header.get("epoch", 0)
        if type(epoch) is not int or not 0 <= epoch < 2**31:
            raise Refused("epoch: a whole number")
        rank = self.job.drivers.index(peer) if peer in self.job.drivers else 0
        if (epoch, -rank) < self._fence:
            raise Refused(f"{FENCED} (epoch {self._fence[0]})")
        self._fence = (epoch, -rank)

    async def _run(self, work: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def _at_step(self, header: dict[str, Any]) -> int:
        step = wire.field(header, "step", int, low=0)
        if step != self.trainer.steps:
            raise Refused(f"this peer is at step {self.trainer.steps}, not {step}")
        return step

    def _input(self, tensor: torch.Tensor) -> torch.Tensor:
        return judge.stage_input(self._ends, tensor, first=self.first)

    # The driver's microbatches.

    async def _op_forward(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        self._at_step(header)
        key = wire.field(header, "key", str)
        (given,) = count(tensors, 1)
        output = await self._run(lambda: self.trainer.forward(key, self._input(given)))
        sent = self._drilled("activations", output)
        self._claim_log.forwarded(key, given, sent)
        return {}, [sent]

    async def _op_backward(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        self._at_step(header)
        key = wire.field(header, "key", str)
        (grad,) = count(tensors, 1)
        grad_input = await self._run(lambda: self.trainer.backward(key, grad))
        self._log_work(peer, grad)
        sent = None if self.first else self._drilled("input-grads", grad_input)
        self._claim_log.backwarded(key, grad, sent)
        return {}, [] if sent is None else [sent]

    async def _op_loss(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        if not self.last:
            raise Refused("only the last stage takes targets")
        self._at_step(header)
        key = wire.field(header, "key", str)
        given, targets = count(tensors, 2)
        labels = targets
        if self._drill.flips_labels():
            labels = attacks.flip_labels(labels, self._ends.config.vocab_size)

        def work() -> tuple[float, torch.Tensor]:
            return self.trainer.loss_backward(key, self._input(given), labels, self._ends)

        loss, grad_input = await self._run(work)
        self._log_work(peer, labels)
        if self._drill.passes_wrong("activations"):
            loss *= 0.5
        sent = None if self.first else self._drilled("input-grads", grad_input)
        self._claim_log.forwarded(key, given, None)
        self._claim_log.backwarded(key, targets, sent, loss)
        return {"loss": loss}, [] if sent is None else [sent]

    def _drilled(self, answer: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, or a wrong one where a drill says so (`AttackDrill.passes_wrong`)."""
        if not self._drill.passes_wrong(answer):
            return tensor
        return attacks.noisy(tensor, seed=self._drill.noise_seed())

    def _log_work(self, driver: str, shaped: torch.Tensor) -> None:
        if self._on_pass is not None:
            self._on_pass(driver, shaped.shape[0] * shaped.shape[1])

    async def _op_reset(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        """Forgets this step's sums: the driver runs their microbatches again."""
        self._at_step(header)
        await self._run(self.trainer.clear)
        self._shares.clear()
        self._claims.clear()
        self._refused.clear()
        self._claim_log.clear()
        return {}, []

    # The step's exchange is `Exchange`'s; the driver names who takes part.

    async def _op_roster(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        members = header.get("members")
        if not (
            isinstance(members, dict)
            and len(members) <= MAX_MEMBERS
            and all(type(s) is int and 0 <= s < len(self.job.stages) for s in members.values())
        ):
            raise Refused(f"members: at most {MAX_MEMBERS} peers with their stage")
        self._roster = members
        return {}, []

    async def _op_verify(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        """Recomputes `target`'s share and answers from the microbatches the driver
        logged (`volunteer.training.judge`); a mismatch is also an accusation with
        evidence where an `on_accuse` takes it."""
        step = self._at_step(header)
        round_ = wire.field(header, "round", int, low=0)
        target = wire.field(header, "target", str)
        received = self._shares.get(round_, {}).get(target)
        if received is None:
            raise Refused(f"no share of {target} came in round {round_}")
        losses = header.get("losses")
        if losses is not None and not (
            isinstance(losses, list) and all(isinstance(x, float) for x in losses)
        ):
            raise Refused("losses: a list of numbers")

        def work() -> dict[str, float]:
            return judge.distances(
                self.trainer, self._ends, first=self.first, last=self.last, received=received,
                tensors=tensors, losses=losses, embed=self._input,
            )  # fmt: skip

        found = await self._run(work)
        signed = self._claims.get(round_, {}).get(target)
        if self._on_accuse is not None and signed is not None and is_wrong(found):
            evidence = await self._run(lambda: self._evidence(signed, received, tensors))
            if evidence is not None:
                self._on_accuse(target, evidence, f"training: its work in step {step} was wrong")
        return found, []

    def _evidence(
        self, signed: SignedClaim, share: torch.Tensor, tensors: list[torch.Tensor]
    ) -> TrainingEvidence | None:
        """Evidence of a wrong share or answers that a stranger can check, once it
        convicts here too (`volunteer.training.evidence`); None where it cannot."""
        weights = [param.detach().clone() for param in self.trainer.params]
        evidence = from_verify(self.job, signed, share, weights, tensors)
        if evidence is None:
            logger.info("a wrong share here, but not one a stranger could check")
            return None
        claim = evidence.checked()
        return evidence if is_wrong(evidence.distances(self.trainer, self._ends, claim)) else None

    async def _op_apply(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        self._at_step(header)
        round_ = wire.field(header, "round", int, low=0)
        included = header.get("included")
        if not isinstance(included, dict) or not included or len(included) > MAX_SHARES:
            raise Refused("included: the peers whose shares make the step, with their samples")
        shares = self._shares.get(round_, {})
        order = sorted(included)
        samples = [included[p] for p in order]
        if not all(type(n) is int and n >= 1 for n in samples):
            raise Refused("sample counts are whole numbers >= 1")
        if any(p not in shares for p in order):
            await self._run(self.trainer.skip_step)
            self._next_step()
            return {"synced": False}, []
        gradients = [shares[p].double() for p in order]

        def work() -> bytes:
            agreed = aggregate(gradients, samples, self.job.aggregation)
            self.trainer.step(agreed)
            return weights_digest(self.trainer.params)

        weights = await self._run(work)
        self._next_step()
        self._weights_at = weights
        # The weights, not the aggregate: peers whose weights drifted apart (another
        # machine's rounding) are brought back to the stage's by `sync`, so the stage's
        # peers hold the same bytes and a share's claim names them.
        return {"synced": True, "digest": weights.hex(), "steps": self.trainer.steps}, []

    def weights(self) -> bytes:
        """`weights_digest` of the stage's weights now (run on the torch thread)."""
        if self._weights_at is None:
            self._weights_at = weights_digest(self.trainer.params)
        return self._weights_at

    # State: a missed step, a move to another stage.

    async def _op_state(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        if peer not in self._roster and peer not in self._drivers:
            raise Refused("the state goes to the job's peers only")
        weights_only = header.get("weights_only") is True  # the result: no optimizer moments
        async with self._handing:
            state = await self._run(self.trainer.state)
        if weights_only:
            state = state[: len(self.trainer.params)]
        answer = {"stage": self.stage, "steps": self.trainer.steps}
        return {**answer, "names": self.trainer.param_names}, state

    async def _op_sync(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        stage = wire.field(header, "stage", int, low=0)
        if stage >= len(self.job.stages):
            raise Refused(f"the job has {len(self.job.stages)} stages")
        source = header.get("source")
        steps = wire.field(header, "steps", int, low=0)
        if stage != self.stage:
            await self._run(lambda: self._join(stage))
        if isinstance(source, str) and source:
            answer, state = await call(
                self.p2p,
                source,
                {"op": "state"},
                timeout_s=MAX_WAIT_S,
                max_answer_bytes=4 * 8 * self.size + (1 << 20),
            )
            if answer.get("stage") != stage or answer.get("steps") != steps:
                raise Refused(f"{source} holds another stage or step")
            await self._run(lambda: self.trainer.load_state(state, steps))
        elif steps != self.trainer.steps:
            raise Refused(f"no peer to take step {steps}'s state from")
        self._next_step()
        return {"stage": self.stage, "steps": self.trainer.steps}, []

    async def _op_info(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        return {
            "stage": self.stage,
            "steps": self.trainer.steps,
            "samples": self.trainer.samples,
        }, []
