"""A training job's data: token id rows of `sequence_length + 1` (inputs and the next
tokens), cut into shards of consecutive rows, each named by the sha256 of its bytes so
anyone holding it can check it (`split_shards`, `check_shards`).

Read from a `.npy` array of token ids (rows at least that long; longer rows are cut), or
from a text file, tokenized with the model's tokenizer and cut into rows. Errors are
`DataError`s naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from volunteer.errors import VolunteerError
from volunteer.training.job import DataShard

MAX_DATA_BYTES = 1 << 30
SHARD_BYTES = 16 << 20
"""What a shard holds at most, unless that makes more than `MAX_JOB_SHARDS`."""
MAX_JOB_SHARDS = 16
"""Shards a job names at most: their hashes must fit the job's DHT record."""


class DataError(VolunteerError):
    """Training data that cannot be used (missing, malformed, too short, out of vocabulary)."""


def shard_hash(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def split_shards(rows: torch.Tensor, count: int = 0) -> list[torch.Tensor]:
    """`rows` cut into `count` shards of consecutive rows, as even as can be (0: as
    many as `SHARD_BYTES` asks, at most `MAX_JOB_SHARDS`; never more than rows)."""
    if count <= 0:
        size = rows.element_size() * rows.numel()
        count = min(MAX_JOB_SHARDS, -(-size // SHARD_BYTES))
    count = max(1, min(count, len(rows)))
    return [rows[len(rows) * i // count : len(rows) * (i + 1) // count] for i in range(count)]


def check_shard(shard: torch.Tensor, sha256: str, sequences: int, index: int) -> None:
    """Raises DataError unless `shard` holds the `sequences` rows that hash to `sha256`."""
    if shard.dtype != torch.int64 or shard.dim() != 2 or len(shard) != sequences:
        raise DataError(f"shard {index} must be {sequences} rows of int64 token ids")
    if shard_hash(shard) != sha256:
        raise DataError(f"shard {index} is not the job's: its sha256 differs")


def check_shards(rows: torch.Tensor, shards: Sequence[DataShard]) -> None:
    """Raises DataError unless `rows` are exactly the `shards`, in order."""
    at = 0
    for index, shard in enumerate(shards):
        check_shard(rows[at : at + shard.sequences], shard.sha256, shard.sequences, index)
        at += shard.sequences
    if at != len(rows):
        raise DataError(f"the data holds {len(rows)} rows, the job's shards {at}")


def load_rows(path: Path, *, sequence_length: int, vocab_size: int, tokenize=None) -> torch.Tensor:
    """The rows of `path` (see the module doc); `tokenize(text) -> ids` for text files.

    Raises:
        DataError: see the class.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read the training data {path}: {exc.strerror}") from None
    if size > MAX_DATA_BYTES:
        raise DataError(f"{path} is over {MAX_DATA_BYTES >> 20} MiB")
    width = sequence_length + 1
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path} is not a .npy array: {exc}") from None
        if array.ndim != 2 or array.dtype.kind not in "iu" or array.shape[1] < width:
            raise DataError(f"{path} must hold integer token ids, rows of at least {width}")
        rows = torch.from_numpy(array[:, :width].astype(np.int64))
    else:
        if tokenize is None:
            raise DataError(f"{path}: text needs the model's tokenizer, and it has none")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read {path} as UTF-8 text: {exc}") from None
        ids = torch.tensor(tokenize(text), dtype=torch.int64)
        count = len(ids) // width
        rows = ids[: count * width].view(count, width)
    if not len(rows):
        raise DataError(f"{path} holds no row of {width} tokens")
    if bool(((rows < 0) | (rows >= vocab_size)).any()):
        raise DataError(f"{path} has token ids outside the model's vocabulary of {vocab_size}")
    return rows.contiguous()


def folder_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    """The encode of the tokenizer in a model folder, or None where it has none (then
    only .npy data can be used)."""
    from volunteer.models.tokenizer import Tokenizer

    try:
        return Tokenizer.from_folder(folder).encode
    except Exception:  # a model folder without a tokenizer
        return None
