"""What a finished training job leaves with its driver: a LoRA job's adapters, taken
from the stages' peers (`volunteer.training.result`) and saved in the adapter store as
one adapter of the whole model, under the name `--save-as` gave (`train-<job id>` by
default). `volunteer chat --adapter NAME`, the API and the TUI use it as they use a
fine-tuned adapter. A job that trains the blocks themselves leaves them with its peers.
"""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

from volunteer.errors import SettingsError
from volunteer.finetune.adapter_info import AdapterError, AdapterInfo, valid_name
from volunteer.finetune.store import AdapterStore
from volunteer.models.adapters import LORA_TARGETS
from volunteer.models.config import ModelConfig
from volunteer.paths import Paths
from volunteer.training.driver import Driver
from volunteer.training.job import TrainingJob
from volunteer.training.result import lora_adapter
from volunteer.training.stage import LORA_SCALE


def result_name(paths: Paths, job: TrainingJob, asked: str | None) -> str | None:
    """The adapter name `job`'s result is to be saved under, checked at creation (a bad
    or taken name fails then, not after a long job); None for a job of the blocks."""
    if job.trains != "lora":
        if asked:
            raise SettingsError("only a LoRA job's result is saved, as an adapter: add --lora-rank")
        return None
    name = asked or f"train-{job.job_id}"
    try:
        valid_name(name)
    except AdapterError as exc:
        raise SettingsError(str(exc)) from None
    if (AdapterStore.of(paths).root / name).exists():
        raise SettingsError(f"adapter {name} already exists: choose another --save-as")
    return name


async def save_result(
    driver: Driver, paths: Paths, config: ModelConfig, name: str, *, loss: float | None, data: str
) -> Path:
    """Takes the job's adapters from its peers and saves them as adapter `name`.

    Raises:
        ResultError: a stage's peers did not hand over one agreed adapter.
        AdapterError: the adapter store could not take it (name taken, disk full).
    """
    job = driver.job
    tensors = lora_adapter(job, await driver.result())
    rank = job.lora_rank or 0
    info = AdapterInfo(
        name=name, method="lora", model=job.model, num_layers=job.num_blocks,
        hidden_size=config.hidden_size, prompt_len=0, rank=rank, alpha=LORA_SCALE * rank,
        targets=LORA_TARGETS, steps=driver.step, train_loss=loss, heldout_loss=None,
        data=f"training job {job.job_id} on {data}"[:4096],
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    )  # fmt: skip
    return await asyncio.to_thread(AdapterStore.of(paths).save, info, tensors)
