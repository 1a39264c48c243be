"""Training jobs and stage members in a real DHT (`volunteer.training.records`): each
reads back under its owner's peer id, and a stranger's junk under the same keys is
dropped, not taken."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from tests.swarm.dht_helpers import two_nodes
from tests.training.swarm_helpers import tiny_data, tiny_job
from volunteer.swarm.dht_records import owner_marker, peer_id_from_owner
from volunteer.swarm.records import RecordError
from volunteer.training.job import Aggregation, job_key
from volunteer.training.records import (
    StageMember,
    announce_member_on_node,
    is_done,
    members_key,
    publish_job_on_node,
    read_jobs_on_node,
    read_members_on_node,
)

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated")


def test_jobs_and_members_read_back_under_their_owners_and_junk_is_dropped() -> None:
    job = tiny_job(tiny_data(97, rows=12, sequence=8), aggregation=Aggregation(kind="mean"))
    creator, peer = RSAPrivateKey(), RSAPrivateKey()

    async def run() -> None:
        async with two_nodes(creator, peer) as (node_a, node_b):
            owner_a, owner_b = owner_marker(creator), owner_marker(peer)
            assert await publish_job_on_node(
                node_a, job, owner=owner_a, expiration_s=60, timeout_s=10
            )
            member = StageMember(job_id=job.job_id, stage=1, steps=4)
            assert await announce_member_on_node(
                node_b, job, member, owner=owner_b, expiration_s=60, timeout_s=10
            )
            # A stranger's junk under the same keys, in its own signed subkeys.
            expires = get_dht_time() + 60
            await node_b.store(job_key(job.model), {"model": 5}, expires, subkey=owner_b)
            stranger = StageMember(job_id=job.job_id, stage=9, steps=0).to_wire()
            await node_a.store(members_key(job), stranger, expires, subkey=owner_a)
            jobs = await read_jobs_on_node(node_b, job.model, timeout_s=10)
            members = await read_members_on_node(node_a, job, timeout_s=10)
            assert jobs == [(peer_id_from_owner(owner_a), job)]
            assert members == {peer_id_from_owner(owner_b): member}  # stage 9 is no stage
            assert await read_jobs_on_node(node_a, "another-model", timeout_s=10) == []

    asyncio.run(run())


def test_a_record_too_large_for_the_dht_is_refused_before_sending() -> None:
    data = tiny_data(97, rows=12, sequence=8)
    job = tiny_job(data, aggregation=Aggregation(kind="mean"))
    many = job.model_copy(update={"shards": job.shards * 200})

    async def run() -> None:
        async with two_nodes(RSAPrivateKey(), RSAPrivateKey()) as (node_a, _):
            with pytest.raises(RecordError, match="must fit in"):
                await publish_job_on_node(
                    node_a, many, owner=owner_marker(RSAPrivateKey()), expiration_s=60,
                    timeout_s=10,
                )  # fmt: skip

    asyncio.run(run())


def test_a_job_is_done_when_most_of_its_peers_say_so() -> None:
    """One hostile peer announcing the last step does not end a job for the others
    (who would then never join it, nor a backup drive it on)."""
    job = tiny_job(tiny_data(64, rows=12, sequence=8), aggregation=Aggregation(kind="mean"))

    def members(*steps: int) -> dict[str, StageMember]:
        return {
            f"peer{i}": StageMember(job_id=job.job_id, stage=i % 2, steps=at)
            for i, at in enumerate(steps)
        }

    assert not is_done(job, {})
    assert not is_done(job, members(3, 3, job.steps))
    assert not is_done(job, members(3, job.steps))
    assert is_done(job, members(3, job.steps, job.steps + 5))
