"""A stage peer on the network: one peer of one SWARM stage of a training job.

It answers the job's driver (`volunteer.training.driver`) on `TRAIN_HANDLE`:

- `forward`, `backward`, `loss`: a microbatch through this stage (the first embeds
  token ids, the last takes the targets and runs forward, loss and backward at once);
  `reset` forgets the step's sums (a banned peer of a later stage gave it gradients);
- `gather`: the step's exchange: it sends its share (mean gradient of the microbatches
  it ran) to every member of its stage, waits for theirs until the deadline, and
  answers with a digest of each share that came (a late or silent peer's is missing);
- `verify`: as a validator, recomputes another peer's share and answers from the
  microbatches the driver logged and says how far each is from its own
  (`volunteer.training.judge`);
- `apply`: aggregates the shares the driver kept (with the sample counts the driver
  counted, not what peers claim) and steps; a peer missing one of them skips the step
  and is told to `sync`;
- `sync`: loads a stage's state from a peer of it (after a missed step, or to move to
  another stage), and `state`: hands its own.

Peers send each other only `share` (to their stage) and `state`, and only peers the
driver's last `roster` named; every other op is the driver's alone.
Torch runs on one worker thread per peer, so the network keeps flowing while it
computes. Every wait has a deadline; a share is checked (size, finite, one per peer and
round, current step) before it is kept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from hivemind.p2p import P2P

from volunteer.models.model import BlockSpan, ModelEnds
from volunteer.training import attacks, judge, wire
from volunteer.training.attack_drill import AttackDrill
from volunteer.training.calls import (
    MAX_ROUNDS,
    TRAIN_HANDLE,
    TrainingCallError,
    call,
    refusal,
)
from volunteer.training.job import TrainingJob
from volunteer.training.stage import StageError, StageTrainer, aggregate
from volunteer.transport.one_shot import serve

MAX_SHARES = 64
"""Shares kept per round (a stage's members; a bound on what strangers can make us hold)."""
MAX_WAIT_S = 120.0
DRIVER_OPS = (
    "roster", "forward", "backward", "loss", "reset", "gather", "verify", "apply", "sync", "info"
)  # fmt: skip
MAX_MEMBERS = 4096
"""Peers of a job a roster may name."""

logger = logging.getLogger(__name__)

SpanFor = Callable[[int, int], BlockSpan]
"""The job's initial weights of blocks [start, end) (every peer builds the same)."""


class Refused(ValueError):
    """A call this peer does not take (a stranger's driver op, another step)."""


class TrainingPeer:
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
        drill: AttackDrill | None = None,
        on_pass: Callable[[str, int], None] | None = None,
    ) -> None:
        self.p2p = p2p
        self.peer_id = p2p.peer_id.to_base58()
        self.job = job
        self._span_for = span_for
        self._ends = ends.eval()
        self._drivers = drivers
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
        self._shares.clear()
        self._drill.begin_step()

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == len(self.job.stages) - 1

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
            if op in DRIVER_OPS and peer not in self._drivers:
                raise Refused(f"{op} is for the job's driver only")
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

    async def _run(self, work: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def _at_step(self, header: dict[str, Any]) -> int:
        step = wire.field(header, "step", int, low=0)
        if step != self.trainer.steps:
            raise Refused(f"this peer is at step {self.trainer.steps}, not {step}")
        return step

    def _input(self, tensor: torch.Tensor) -> torch.Tensor:
        """A microbatch's input to this stage: token ids embedded on the first."""
        if not self.first:
            return tensor
        if tensor.dtype != torch.int64 or tensor.dim() != 2:
            raise StageError("the first stage takes token ids, int64 [batch, seq]")
        if bool(((tensor < 0) | (tensor >= self._ends.config.vocab_size)).any()):
            raise StageError("token ids out of the vocabulary")
        with torch.no_grad():
            return self._ends.embed(tensor)

    # The driver's microbatches.

    async def _op_forward(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        self._at_step(header)
        key = wire.field(header, "key", str)
        (given,) = _count(tensors, 1)
        output = await self._run(lambda: self.trainer.forward(key, self._input(given)))
        return {}, [self._drilled("activations", output)]

    async def _op_backward(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        self._at_step(header)
        key = wire.field(header, "key", str)
        (grad,) = _count(tensors, 1)
        grad_input = await self._run(lambda: self.trainer.backward(key, grad))
        self._log_work(peer, grad)
        return {}, [] if self.first else [self._drilled("input-grads", grad_input)]

    async def _op_loss(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        if not self.last:
            raise Refused("only the last stage takes targets")
        self._at_step(header)
        key = wire.field(header, "key", str)
        given, labels = _count(tensors, 2)
        if self._drill.flips_labels():
            labels = attacks.flip_labels(labels, self._ends.config.vocab_size)

        def work() -> tuple[float, torch.Tensor]:
            return self.trainer.loss_backward(key, self._input(given), labels, self._ends)

        loss, grad_input = await self._run(work)
        self._log_work(peer, labels)
        if self._drill.passes_wrong("activations"):
            loss *= 0.5
        return {"loss": loss}, [] if self.first else [self._drilled("input-grads", grad_input)]

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
        return {}, []

    # The step's exchange.

    async def _op_gather(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        step = self._at_step(header)
        round_ = wire.field(header, "round", int, low=0)
        senders = _peer_list(header, "senders")
        members = _peer_list(header, "members")
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
            shares[self.peer_id] = sent
            message = wire.pack({"op": "share", "step": step, "round": round_}, [sent])
            await asyncio.gather(
                *(
                    self._send(member, message, deadline)
                    for member in members
                    if member != self.peer_id
                )
            )
        await self._wait_for(round_, senders, deadline)
        return {"shares": {p: _digest(shares[p]) for p in senders if p in shares}}, []

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
        left = deadline - asyncio.get_running_loop().time()
        async with self._arrived:
            with contextlib.suppress(asyncio.TimeoutError):  # who is missing is the answer
                await asyncio.wait_for(
                    self._arrived.wait_for(lambda: all(p in shares for p in senders)),
                    max(left, 0.0),
                )

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

    async def _op_share(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        self._at_step(header)
        if self._roster.get(peer) != self.stage:
            raise Refused("shares come from this stage's peers only")
        round_ = wire.field(header, "round", int, low=0)
        if round_ >= MAX_ROUNDS:
            raise Refused(f"a step has at most {MAX_ROUNDS} rounds")
        (share,) = _count(tensors, 1)
        if share.dtype != torch.float32 or share.shape != (self.size,):
            raise Refused(f"a share is {self.size} float32 numbers")
        shares = self._shares.setdefault(round_, {})
        if peer in shares:
            raise Refused("one share per peer and round")
        if len(shares) >= MAX_SHARES:
            raise Refused("too many shares in this round")
        async with self._arrived:
            shares[peer] = share
            self._arrived.notify_all()
        return {}, []

    async def _op_verify(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        """Recomputes `target`'s share and answers from the microbatches the driver
        logged (`volunteer.training.judge`)."""
        self._at_step(header)
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

        return await self._run(work), []

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

        def work() -> str:
            agreed = aggregate(gradients, samples, self.job.aggregation)
            self.trainer.step(agreed)
            return _digest(agreed.float())

        digest = await self._run(work)
        self._next_step()
        return {"synced": True, "digest": digest, "steps": self.trainer.steps}, []

    # State: a missed step, a move to another stage.

    async def _op_state(self, peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        if peer not in self._roster and peer not in self._drivers:
            raise Refused("the state goes to the job's peers only")
        async with self._handing:
            state = await self._run(self.trainer.state)
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


def _count(tensors: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    if len(tensors) != count:
        raise Refused(f"expected {count} tensors, got {len(tensors)}")
    return tensors


def _peer_list(header: dict[str, Any], name: str) -> list[str]:
    peers = header.get(name)
    if (
        not isinstance(peers, list)
        or len(peers) > MAX_SHARES
        or not all(isinstance(p, str) for p in peers)
    ):
        raise Refused(f"{name}: at most {MAX_SHARES} peer ids")
    return peers


def _digest(share: torch.Tensor) -> str:
    return hashlib.sha256(share.numpy().tobytes()).hexdigest()[:32]
