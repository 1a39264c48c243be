"""What a finished training job leaves with its driver, taken from the stages' peers
(`volunteer.training.result`) under the name `--save-as` gave (`train-<job id>` by
default):

- a LoRA job: one adapter of the whole model in the adapter store, which `volunteer
  chat --adapter NAME`, the API and the TUI use as they use a fine-tuned adapter;
- a job of the blocks: a model folder, `<data dir>/trained/NAME`, a copy of the model's
  (config, tokenizer) with the trained blocks in its `model.safetensors`, which
  `volunteer chat --model PATH` and `volunteer start --model PATH` load.

Both are written whole or not at all (a temporary folder renamed into place).
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
from pathlib import Path

import safetensors.torch
import torch

from volunteer.errors import SettingsError, VolunteerError
from volunteer.finetune.adapter_info import AdapterError, AdapterInfo, valid_name
from volunteer.finetune.store import AdapterStore
from volunteer.machine.atomic import disk_full_as_error, publish_dir, staging_dir
from volunteer.model_cache.files import MANIFEST_NAME
from volunteer.models.adapters import LORA_TARGETS
from volunteer.models.checkpoint import SafetensorsFolder, hf_block_tensors
from volunteer.models.config import ModelConfig
from volunteer.models.errors import CheckpointError
from volunteer.paths import Paths
from volunteer.training.driver import Driver
from volunteer.training.job import TrainingJob
from volunteer.training.result import Named, block_weights, lora_adapter
from volunteer.training.stage import LORA_SCALE

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".gguf", ".bin", ".pt", ".pth")
"""Files of a model folder that hold weights: not copied into a trained model's folder."""


class ResultSaveError(VolunteerError):
    """The result could not be written (the name was taken meanwhile, the disk is full)."""


def result_place(paths: Paths, job: TrainingJob, asked: str | None) -> tuple[str, Path]:
    """The name and place `job`'s result is to be saved under, checked at creation (a
    bad or taken name fails then, not after a long job)."""
    name = asked or f"train-{job.job_id}"
    try:
        valid_name(name)
    except AdapterError as exc:
        raise SettingsError(str(exc)) from None
    place = _place(paths, job, name)
    if place.exists():
        raise SettingsError(f"{place} already exists: choose another --save-as")
    return name, place


def _place(paths: Paths, job: TrainingJob, name: str) -> Path:
    if job.trains == "lora":
        return AdapterStore.of(paths).root / name
    return paths.data_dir / "trained" / name


async def save_result(
    driver: Driver,
    paths: Paths,
    config: ModelConfig,
    name: str,
    *,
    model_folder: Path,
    loss: float | None,
    data: str,
) -> Path:
    """Takes the job's trained tensors from its peers and saves them (module doc).

    Raises:
        ResultError: a stage's peers did not hand over one agreed set of tensors.
        ResultSaveError, AdapterError: the result could not be written.
    """
    job = driver.job
    stages = await driver.result()
    if job.trains != "lora":
        place = _place(paths, job, name)
        return await asyncio.to_thread(_write_model, model_folder, place, job, stages)
    rank = job.lora_rank or 0
    info = AdapterInfo(
        name=name, method="lora", model=job.model, num_layers=job.num_blocks,
        hidden_size=config.hidden_size, prompt_len=0, rank=rank, alpha=LORA_SCALE * rank,
        targets=LORA_TARGETS, steps=driver.step, train_loss=loss, heldout_loss=None,
        data=f"training job {job.job_id} on {data}"[:4096],
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
    )  # fmt: skip
    tensors = lora_adapter(job, stages)
    return await asyncio.to_thread(AdapterStore.of(paths).save, info, tensors)


def _write_model(source: Path, dest: Path, job: TrainingJob, stages: list[Named]) -> Path:
    """`source`'s model folder with the trained blocks in place of its own."""
    try:
        files = SafetensorsFolder.open(source)
        tensors = {
            name: files.read((name,), dtype=torch.float32, device="cpu")
            for name in files.files_by_tensor
        }
        shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
        for index, block in block_weights(job, stages).items():
            tensors.update(hf_block_tensors(index, block, shapes))
    except CheckpointError as exc:
        raise ResultSaveError(f"the trained blocks do not fit {source}: {exc}") from None
    with staging_dir(dest) as tmp, disk_full_as_error(dest):
        for path in sorted(source.iterdir()):
            if path.is_file() and not _holds_weights(path.name):
                shutil.copyfile(path, tmp / path.name)
        contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
        safetensors.torch.save_file(contiguous, str(tmp / "model.safetensors"))
        if not publish_dir(tmp, dest):
            raise ResultSaveError(f"{dest} appeared while the result was written")
    return dest


def _holds_weights(name: str) -> bool:
    hidden = name.startswith(".") or name == MANIFEST_NAME  # the cache's own records
    return hidden or name.endswith(WEIGHT_SUFFIXES)
