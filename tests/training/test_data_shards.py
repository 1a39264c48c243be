"""A job's data in shards (`volunteer.training.data`), and between its drivers on
loopback (`volunteer.daemon.training_shards`): each shard is checked against the hash
the job names, and only the job's drivers get them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from hivemind.p2p import P2P

from tests.training.swarm_helpers import tiny_data, tiny_job
from volunteer.daemon.training_shards import DATA_HANDLE, fetch_shards, serve_shards
from volunteer.errors import SettingsError
from volunteer.training.calls import TrainingCallError, call
from volunteer.training.data import (
    MAX_JOB_SHARDS,
    SHARD_BYTES,
    DataError,
    check_shard,
    check_shards,
    shard_hash,
    split_shards,
)
from volunteer.training.job import Aggregation, DataShard, TrainingJob
from volunteer.training.loopback import LOOPBACK

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated")


def _sharded(rows: torch.Tensor, count: int, drivers: tuple[str, ...] = ()) -> TrainingJob:
    shards = tuple(
        DataShard(sha256=shard_hash(shard), sequences=len(shard))
        for shard in split_shards(rows, count)
    )
    job = tiny_job(rows, aggregation=Aggregation(kind="mean"))
    return job.model_copy(update={"shards": shards, "drivers": drivers})


def test_rows_split_into_even_shards_in_order() -> None:
    rows = tiny_data(64, rows=10, sequence=8)
    shards = split_shards(rows, 3)
    assert [len(shard) for shard in shards] == [3, 3, 4]
    assert torch.equal(torch.cat(shards), rows)
    assert len(split_shards(rows, 50)) == 10  # never an empty shard
    assert len(split_shards(rows)) == 1  # small data: one shard
    row_bytes = 8 * 8
    big = torch.zeros(1, 8, dtype=torch.int64).expand(3 * SHARD_BYTES // row_bytes + 1, 8)
    assert len(split_shards(big)) == 4  # just over 3 shards' worth of bytes
    huge = torch.zeros(MAX_JOB_SHARDS * 4, 1, dtype=torch.int64).expand(-1, SHARD_BYTES)
    assert len(split_shards(huge)) == MAX_JOB_SHARDS


def test_data_that_is_not_the_jobs_is_refused_naming_the_shard() -> None:
    rows = tiny_data(64, rows=10, sequence=8)
    job = _sharded(rows, 3)
    check_shards(rows, job.shards)
    changed = rows.clone()
    changed[7, 2] += 1
    with pytest.raises(DataError, match="shard 2 is not the job's"):
        check_shards(changed, job.shards)
    with pytest.raises(DataError, match="holds 11 rows"):
        check_shards(torch.cat([rows, rows[:1]]), job.shards)
    with pytest.raises(DataError, match="shard 0 must be 3 rows"):
        check_shards(rows[:2], job.shards)
    with pytest.raises(DataError, match="int64"):
        check_shard(rows[:3].int(), job.shards[0].sha256, 3, 0)


def test_a_backup_fetches_the_shards_and_a_stranger_gets_none(tmp_path: Path) -> None:
    rows = tiny_data(64, rows=10, sequence=8)

    async def run() -> None:
        driver = await P2P.create(host_maddrs=LOOPBACK)
        maddrs = await driver.get_visible_maddrs()
        backup = await P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
        stranger = await P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
        ids = (driver.peer_id.to_base58(), backup.peer_id.to_base58())
        job = _sharded(rows, 3, ids)
        serving = asyncio.ensure_future(serve_shards(driver, job, rows))
        try:
            await asyncio.sleep(0.2)
            path = await fetch_shards(backup, ids[0], job, tmp_path / "fetched.npy")
            assert torch.equal(torch.from_numpy(np.load(path, allow_pickle=False)), rows)
            with pytest.raises(SettingsError, match="drivers only"):
                await fetch_shards(stranger, ids[0], job, tmp_path / "stolen.npy")
            with pytest.raises(TrainingCallError, match="3 shards"):
                await call(backup, ids[0], {"op": "shard", "job": job.job_id, "index": 3},
                           handle=DATA_HANDLE, timeout_s=10, max_answer_bytes=1 << 16)  # fmt: skip
            # A driver handing out other data than the job's is found out.
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            changed = rows.clone()
            changed[4, 0] += 1
            serving = asyncio.ensure_future(serve_shards(driver, job, changed))
            await asyncio.sleep(0.2)
            with pytest.raises(SettingsError, match="shard 1 is not the job's"):
                await fetch_shards(backup, ids[0], job, tmp_path / "bad.npy")
            assert not (tmp_path / "bad.npy").exists()
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            for p2p in (stranger, backup, driver):
                await p2p.shutdown()

    asyncio.run(run())
