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

import msgpack
import pydantic
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from volunteer.swarm.dht_records import peer_id_from_owner
from volunteer.swarm.dht_validator import MAX_RECORD_BYTES
from volunteer.swarm.records import RecordError, WireRecord
from volunteer.training.job import MAX_STAGES, TrainingJob, job_key

_TIMEOUTS = (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)
MAX_JOB_BYTES = MAX_RECORD_BYTES - 1024
"""A job's wire form, leaving room for the signature: a job of many shards names a
manifest of them instead (a later issue)."""

logger = logging.getLogger(__name__)


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
    found = await _read(node, job_key(model), timeout_s)
    if found is None:
        return None
    jobs = []
    for creator, value in found:
        try:
            job = TrainingJob.from_wire(value)
        except RecordError as exc:
            logger.debug("dropped a training job of %s: %s", creator, exc)
            continue
        if job.model == model:
            jobs.append((creator, job))
    return jobs


async def read_members_on_node(
    node: DHTNode, job: TrainingJob, *, timeout_s: float
) -> dict[str, StageMember] | None:
    """Each peer announced as a stage peer of `job` (None: the DHT did not answer)."""
    found = await _read(node, members_key(job), timeout_s)
    if found is None:
        return None
    members = {}
    for peer, value in found:
        try:
            member = StageMember.from_wire(value)
        except RecordError as exc:
            logger.debug("dropped a stage member record of %s: %s", peer, exc)
            continue
        if member.job_id == job.job_id and member.stage < len(job.stages):
            members[peer] = member
    return members


async def _store(
    node: DHTNode,
    key: str,
    value: object,
    owner: bytes,
    expiration_s: float,
    timeout_s: float,
) -> bool:
    if value is not None and len(msgpack.packb(value, use_bin_type=True)) > MAX_JOB_BYTES:
        raise RecordError(f"a training record must fit in {MAX_JOB_BYTES} bytes")
    try:
        stored = await asyncio.wait_for(
            node.store(key, value, get_dht_time() + expiration_s, subkey=owner), timeout=timeout_s
        )
    except _TIMEOUTS:
        return False
    return bool(stored)


async def _read(node: DHTNode, key: str, timeout_s: float) -> list[tuple[str, object]] | None:
    try:
        found = await asyncio.wait_for(node.get(key, latest=True), timeout=timeout_s)
    except _TIMEOUTS:
        return None
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    read = []
    for subkey, item in found.value.items():
        if item.expiration_time <= now or item.value is None:
            continue
        try:
            read.append((peer_id_from_owner(subkey), item.value))
        except (RecordError, ValueError) as exc:
            logger.debug("dropped a training record under %r: %s", subkey, exc)
    return read
