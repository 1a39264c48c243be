"""A job's data between its drivers, shard by shard: the driving daemon hands each
shard to the job's other drivers (and nobody else: the data may be private), and a
backup that has no copy of the data fetches every shard and checks it against the hash
the job names before it keeps it (`volunteer train standby` without DATA).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hivemind.p2p import P2P

from volunteer.errors import SettingsError
from volunteer.machine.atomic import write_file_atomic
from volunteer.training import wire
from volunteer.training.calls import TrainingCallError, call, refusal
from volunteer.training.data import DataError, check_shard
from volunteer.training.job import TrainingJob
from volunteer.transport.one_shot import serve

DATA_HANDLE = "Train.data"
SHARD_TIMEOUT_S = 120.0
"""A shard is at most 64 MiB (1 GiB of data in 16 shards)."""

logger = logging.getLogger(__name__)


def shard_answerer(job: TrainingJob, rows: torch.Tensor) -> Callable:
    """The answer to a driver of `job` asking for one of its shards of `rows`."""
    starts = [0]
    for shard in job.shards:
        starts.append(starts[-1] + shard.sequences)

    async def answer(peer: str, body: bytes) -> bytes:
        try:
            header, _ = wire.unpack(body, max_tensors=0)
            if peer not in job.drivers:
                raise ValueError("the job's data goes to its drivers only")
            if wire.field(header, "job", str) != job.job_id:
                raise ValueError(f"this daemon drives job {job.job_id}")
            index = wire.field(header, "index", int, low=0)
            if index >= len(job.shards):
                raise ValueError(f"the job has {len(job.shards)} shards")
            return wire.pack({}, [rows[starts[index] : starts[index + 1]]])
        except (wire.WireError, ValueError) as exc:
            return refusal(str(exc))

    return answer


async def serve_shards(p2p: P2P, job: TrainingJob, rows: torch.Tensor) -> None:
    """Hands `job`'s shards out until cancelled."""
    handler = serve(shard_answerer(job, rows), max_request_bytes=4096, max_serving=2)
    await p2p.add_binary_stream_handler(DATA_HANDLE, handler)
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):  # p2p may be shutting down under it
            await p2p.remove_binary_stream_handler(DATA_HANDLE)


async def fetch_shards(p2p: P2P, peer: str, job: TrainingJob, place: Path) -> str:
    """Every shard of `job` from `peer`, each checked against its hash, saved together
    at `place` (a .npy file); the path.

    Raises:
        SettingsError: a shard did not come, or is not the job's.
    """
    shards = []
    width = job.sequence_length + 1
    for index, shard in enumerate(job.shards):
        header = {"op": "shard", "job": job.job_id, "index": index}
        try:
            _, out = await call(
                p2p, peer, header, handle=DATA_HANDLE, timeout_s=SHARD_TIMEOUT_S,
                max_answer_bytes=shard.sequences * width * 8 + (1 << 16),
            )  # fmt: skip
            if len(out) != 1:
                raise DataError(f"shard {index} came as {len(out)} tensors")
            check_shard(out[0], shard.sha256, shard.sequences, index)
        except (TrainingCallError, DataError) as exc:
            raise SettingsError(f"the job's data could not be fetched from {peer}: {exc}") from None
        shards.append(out[0])
    rows = torch.cat(shards)

    def save() -> None:
        buffer = _npy_bytes(rows.numpy())
        place.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(place, buffer)

    await asyncio.to_thread(save)
    logger.info("fetched job %s's %d shards from %s", job.job_id, len(shards), peer)
    return str(place)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
