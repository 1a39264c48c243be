"""Training jobs and their stage peers in the DHT.

- `job_key(model)` -> the creator's signed subkey -> its `TrainingJob` (one per creator):
  the creator is the job's driver, so a peer learns whom to obey from the owner marker
  of the subkey the job came in, which nobody else can write.
- `members_key(job)` -> each stage peer's signed subkey -> its `StageMember` (stage,
  step, speed): how the driver finds the peers that joined, and `train status` counts
  a stage's peers.

Records are checked as strangers' (`WireRecord`); a malformed one is dropped and logged
at debug level (a hostile peer could otherwise fill the log).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import TypeVar

import msgpack
import pydantic
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from volunteer.swarm.dht_records import read_owned_on_node
from volunteer.swarm.dht_validator import MAX_RECORD_BYTES
from volunteer.swarm.records import RecordError, WireRecord
from volunteer.training.job import MAX_STAGES, TrainingJob, job_key

_TIMEOUTS = (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)
MAX_JOB_BYTES = MAX_RECORD_BYTES - 1024
"""A job's wire form, leaving room for the signature: a job of many shards names a
manifest of them instead (a later issue)."""

logger = logging.getLogger(__name__)
R = TypeVar("R", bound=WireRecord)


class StageMember(WireRecord):
    """A stage peer's announcement."""

    RECORD_NAME = "stage member"

    job_id: str = pydantic.Field(pattern=r"^[0-9a-f]{16}$")
    stage: int = pydantic.Field(ge=0, lt=MAX_STAGES)
    steps: int = pydantic.Field(ge=0, le=10**12)
    """Global steps it has taken."""


def members_key(job: TrainingJob) -> str:
    return f"{job_key(job.model)}.{job.job_id}"


async def publish_job_on_node(
    node: DHTNode, job: TrainingJob, *, owner: bytes, expiration_s: float, timeout_s: float
) -> bool:
    """Announces `job` in this peer's subkey (False: refused or timed out).

    Raises:
        RecordError: the job is too large for one DHT record.
    """
    return await _store(node, job_key(job.model), job.to_wire(), owner, expiration_s, timeout_s)


async def announce_member_on_node(
    node: DHTNode,
    job: TrainingJob,
    member: StageMember,
    *,
    owner: bytes,
    expiration_s: float,
    timeout_s: float,
) -> bool:
    return await _store(node, members_key(job), member.to_wire(), owner, expiration_s, timeout_s)


async def read_jobs_on_node(
    node: DHTNode, model: str, *, timeout_s: float
) -> list[tuple[str, TrainingJob]] | None:
    """Each (creator, job) announced for `model` (None: the DHT did not answer)."""
    found = await read_owned_on_node(node, job_key(model), timeout_s=timeout_s)
    if found is None:
        return None
    return [(creator, job) for creator, job in _parsed(found, TrainingJob) if job.model == model]


async def read_members_on_node(
    node: DHTNode, job: TrainingJob, *, timeout_s: float
) -> dict[str, StageMember] | None:
    """Each peer announced as a stage peer of `job` (None: the DHT did not answer)."""
    found = await read_owned_on_node(node, members_key(job), timeout_s=timeout_s)
    if found is None:
        return None
    return {
        peer: member
        for peer, member in _parsed(found, StageMember)
        if member.job_id == job.job_id and member.stage < len(job.stages)
    }


def is_done(job: TrainingJob, members: dict[str, StageMember]) -> bool:
    """Whether most of `job`'s announced peers took its last step (most, not any: a
    hostile peer can announce any step)."""
    return 2 * sum(member.steps >= job.steps for member in members.values()) > len(members)


def _parsed(found: list[tuple[str, object]], record: type[R]) -> list[tuple[str, R]]:
    """The values that are valid `record`s, with their owners (the rest logged at debug)."""
    parsed = []
    for owner, value in found:
        try:
            parsed.append((owner, record.from_wire(value)))
        except RecordError as exc:
            logger.debug("dropped a %s of %s: %s", record.RECORD_NAME, owner, exc)
    return parsed


async def _store(
    node: DHTNode,
    key: str,
    value: object,
    owner: bytes,
    expiration_s: float,
    timeout_s: float,
) -> bool:
    if len(msgpack.packb(value, use_bin_type=True)) > MAX_JOB_BYTES:
        raise RecordError(f"a training record must fit in {MAX_JOB_BYTES} bytes")
    try:
        stored = await asyncio.wait_for(
            node.store(key, value, get_dht_time() + expiration_s, subkey=owner), timeout=timeout_s
        )
    except _TIMEOUTS:
        return False
    return bool(stored)
