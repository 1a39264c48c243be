"""The weights' hash: the same files give the same hash anywhere, other files another, and
it is kept beside them until they change."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from volunteer.errors import ModelStoreError
from volunteer.model_cache.weights_hash import CACHE_NAME, weights_hash


def _model(folder: Path, *, scale: float = 1.0) -> Path:
    """A two-shard model folder, with a config that is not part of the weights."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for shard in ("model-00001-of-00002", "model-00002-of-00002"):
        weights = {"w": (scale * rng.standard_normal((8, 8))).astype(np.float32)}
        save_file(weights, folder / f"{shard}.safetensors")
    (folder / "config.json").write_text("{}")
    return folder


def _touch_later(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_the_same_weights_hash_the_same_anywhere(tmp_path: Path) -> None:
    first = _model(tmp_path / "first")
    digest = weights_hash(first)
    assert len(digest) == 64 and int(digest, 16) >= 0
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    (copy / CACHE_NAME).unlink()
    (copy / "config.json").write_text('{"other": "config"}')  # not a weight
    assert weights_hash(copy) == digest
    assert weights_hash(first) == digest  # again, from the cache


def test_other_weights_hash_otherwise(tmp_path: Path) -> None:
    ours = weights_hash(_model(tmp_path / "ours"))
    assert weights_hash(_model(tmp_path / "theirs", scale=1.001)) != ours
    renamed = _model(tmp_path / "renamed")
    (renamed / "model-00002-of-00002.safetensors").rename(renamed / "extra.safetensors")
    assert weights_hash(renamed) != ours
    dropped = _model(tmp_path / "dropped")
    (dropped / "model-00002-of-00002.safetensors").unlink()
    assert weights_hash(dropped) != ours


def test_the_hash_is_kept_until_a_file_changes(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m")
    digest = weights_hash(folder)
    cache = folder / CACHE_NAME
    kept = json.loads(cache.read_text())
    assert kept["sha256"] == digest
    # What is kept is what is used: the files are not read again while they stand still.
    cache.write_text(json.dumps({**kept, "sha256": "c" * 64}))
    assert weights_hash(folder) == "c" * 64
    # A touched (or rewritten) file is hashed again, and the cache follows.
    _touch_later(folder / "model-00001-of-00002.safetensors")
    assert weights_hash(folder) == digest
    assert json.loads(cache.read_text())["sha256"] == digest


@pytest.mark.parametrize(
    "cached", ["not json", "[]", '{"format": "volunteer-weights-sha256/1", "sha256": "x"}']
)
def test_a_damaged_cache_is_hashed_again(tmp_path: Path, cached: str) -> None:
    folder = _model(tmp_path / "m")
    digest = weights_hash(folder)
    (folder / CACHE_NAME).write_text(cached)
    assert weights_hash(folder) == digest


def test_a_cache_that_cannot_be_written_leaves_the_hash_right(tmp_path: Path) -> None:
    folder = _model(tmp_path / "m")
    digest = weights_hash(folder)
    (folder / CACHE_NAME).unlink()
    (folder / CACHE_NAME).mkdir()  # in the way of the file, as a read-only folder would be
    assert weights_hash(folder) == digest
    assert weights_hash(folder) == digest  # hashed again, still right


def test_a_folder_without_weights_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelStoreError, match=r"no \*\.safetensors"):
        weights_hash(tmp_path)
