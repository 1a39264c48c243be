"""The model a daemon serves or chats with: its files, its config and its name in the swarm."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from volunteer.model_cache.store import ModelStore
from volunteer.models.config import ModelConfig
from volunteer.swarm.records import MODEL_NAME_RE

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._\-]+")


@dataclasses.dataclass(frozen=True)
class ServedModel:
    folder: Path
    """The Hugging Face-format folder (config, safetensors, tokenizer)."""
    config: ModelConfig
    swarm_name: str
    """The name its DHT records go under; every peer of the swarm must use the same."""


def open_model(name: str, models_dir: Path) -> ServedModel:
    """Finds (fetching if needed) the model `name` and reads its config. Blocks.

    Raises:
        ModelStoreError: see `ModelStore.pull`.
        ModelConfigError: the folder's config.json is unusable.
    """
    folder = ModelStore(models_dir).pull(name, progress=False)
    return ServedModel(folder, ModelConfig.from_hf_folder(folder), swarm_model_name(name, folder))


def swarm_model_name(name: str, folder: Path) -> str:
    """`name` itself for registered names and repo ids; a local path goes by its folder's
    name, so that peers who keep the same files in different places still agree."""
    if MODEL_NAME_RE.fullmatch(name) and not Path(name).expanduser().exists():
        return name
    slug = _UNSAFE_NAME_CHARS.sub("-", folder.name).strip("-._") or "model"
    return slug[:128]
