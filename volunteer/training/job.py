"""A training job: what a collaborative training run trains, on what data, how.

Its creator announces it in the DHT under `job_key(model)`, in the subkey of its own key
(the DHT's signature checks make that subkey writable by the creator alone, so the record
is signed by it); peers read it back as a stranger's record and validate every field.
The job's id is the hash of its canonical content: a job never changes under its id, and
peers that train "job X" agree on everything in it. Errors are `RecordError`s.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

import pydantic

from volunteer.swarm.records import (
    MAX_BLOCKS,
    MODEL_NAME_RE,
    SCHEMA_VERSION,
    WEIGHTS_SHA256_RE,
    WireRecord,
    check_model_name,
)

MAX_STAGES = 64
MAX_SHARDS = 4096
MAX_BATCH = 65_536
MAX_SEQUENCE = 65_536
MAX_LORA_RANK = 256
MAX_DRIVERS = 8
PEER_ID_PATTERN = r"^[1-9A-HJ-NP-Za-km-z]{32,128}$"
"""A libp2p peer id in base58."""
JOB_ID_CHARS = 16
"""Hex digits of the content hash that name a job (64 bits: no two jobs of one creator
and model collide by chance)."""


def _tuples(value: object) -> object:
    """Lists (the wire has no tuples) as tuples, at any depth; anything else as it is."""
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value


class Optimizer(WireRecord):
    """The optimizer every peer of a stage steps with (so their states stay equal)."""

    name: Literal["adamw", "sgd"]
    lr: float = pydantic.Field(gt=0.0, le=10.0, allow_inf_nan=False)
    weight_decay: float = pydantic.Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's; ignored by SGD."""
    momentum: float = pydantic.Field(default=0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    """SGD's; ignored by AdamW."""

    _wire_betas = pydantic.field_validator("betas", mode="before")(lambda value: _tuples(value))

    @pydantic.field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError("betas must be in [0, 1)")
        return betas


class Aggregation(WireRecord):
    """How a stage's peers combine their gradients each step."""

    kind: Literal["mean", "centered-clip"]
    tau: float = pydantic.Field(default=1.0, gt=0.0, le=1e6, allow_inf_nan=False)
    """CenteredClip's radius (`volunteer.training.centered_clip`)."""
    iterations: int = pydantic.Field(default=20, ge=1, le=1000)


class DataShard(WireRecord):
    """One piece of the job's data, assigned to trainer peers whole; anyone holding it
    can check it against its hash."""

    sha256: str = pydantic.Field(pattern=WEIGHTS_SHA256_RE)
    sequences: int = pydantic.Field(ge=1, le=2**40)


class TrainingJob(WireRecord):
    """A training job as announced (module doc)."""

    RECORD_NAME = "training job"

    schema_version: int = pydantic.Field(default=SCHEMA_VERSION, ge=1, le=2**16)
    model: str = pydantic.Field(pattern=MODEL_NAME_RE.pattern)
    num_blocks: int = pydantic.Field(ge=1, le=MAX_BLOCKS)
    trains: Literal["blocks", "lora"]
    """The full blocks (a small model), or LoRA adapters of the blocks (a large one)."""
    lora_rank: int | None = pydantic.Field(default=None, ge=1, le=MAX_LORA_RANK)
    stages: tuple[tuple[int, int], ...] = pydantic.Field(min_length=1, max_length=MAX_STAGES)
    """Each stage's blocks [start, end): together, every block once, in order."""
    shards: tuple[DataShard, ...] = pydantic.Field(min_length=1, max_length=MAX_SHARDS)
    sequence_length: int = pydantic.Field(ge=2, le=MAX_SEQUENCE)
    batch_size: int = pydantic.Field(ge=1, le=MAX_BATCH)
    """Sequences per global step, over all the job's pipelines."""
    microbatch_size: int = pydantic.Field(ge=1, le=MAX_BATCH)
    """Sequences routed through the stages at a time."""
    optimizer: Optimizer
    aggregation: Aggregation
    seed: int = pydantic.Field(ge=0, lt=2**63)
    """The public seed validators recompute a peer's microbatch from."""
    steps: int = pydantic.Field(ge=1, le=10**9)
    drivers: tuple[Annotated[str, pydantic.StringConstraints(pattern=PEER_ID_PATTERN)], ...] = (
        pydantic.Field(default=(), max_length=MAX_DRIVERS)
    )
    """The peers that may drive the job, in order: its creator, then the backups it
    trusts to drive on if it is gone for good (`volunteer.daemon.training_standby`).
    Empty: whoever announced it, alone."""

    @pydantic.field_validator("stages", "shards", "drivers", mode="before")
    @classmethod
    def _from_lists(cls, value: object) -> object:
        return _tuples(value)

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> TrainingJob:
        end = 0
        for start, stop in self.stages:
            if start != end or stop <= start:
                raise ValueError(
                    f"stages must cover blocks 0..{self.num_blocks} in order without gaps, "
                    f"but one is [{start}, {stop}) after block {end}"
                )
            end = stop
        if end != self.num_blocks:
            raise ValueError(f"stages end at block {end}, the model has {self.num_blocks}")
        if (self.trains == "lora") != (self.lora_rank is not None):
            raise ValueError("lora_rank is given exactly when the job trains LoRA adapters")
        if len(set(self.drivers)) != len(self.drivers):
            raise ValueError("a driver is named twice")
        if self.batch_size % self.microbatch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of "
                f"microbatch_size {self.microbatch_size}"
            )
        return self

    @property
    def job_id(self) -> str:
        """The hash of the job's canonical content (its name among peers)."""
        canonical = json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:JOB_ID_CHARS]

    def may_drive(self, peer: str, announcer: str) -> bool:
        """Whether `peer` may drive the job `announcer` announced (see `drivers`)."""
        return peer in self.drivers if self.drivers else peer == announcer

    def ends_of(self, stage: int) -> tuple[bool, bool]:
        """Whether `stage` is the first (it embeds token ids) and the last (it takes the
        targets)."""
        return stage == 0, stage == len(self.stages) - 1

    def stage_of(self, block: int) -> int:
        """The stage holding `block`."""
        for index, (start, stop) in enumerate(self.stages):
            if start <= block < stop:
                return index
        raise ValueError(f"block {block} is outside the model's {self.num_blocks} blocks")


def job_key(model: str) -> str:
    """The DHT key under which creators announce jobs that train `model` (one each).

    Raises:
        RecordError: the model name has characters we do not allow.
    """
    return f"{check_model_name(model)}.training"
