"""Checks on model files: safetensors headers parsed defensively, manifests read back."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from volunteer.errors import IntegrityError, ModelStoreError
from volunteer.model_cache.files import (
    MANIFEST_NAME,
    check_safetensors,
    read_manifest,
    write_manifest,
)


def _safetensors(path: Path, header: dict[str, object], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_check_safetensors_accepts_a_real_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file({"a": np.zeros((2, 3), np.float32), "b": np.zeros(5, np.int8)}, path)

    assert check_safetensors(path) == 2


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "trailing"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
        (
            {
                "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
            },
            b"\0" * 6,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "malformed header entry"),
        (["not", "an", "object"], b"", "not an object"),
    ],
)
def test_check_safetensors_rejects_bad_files(
    tmp_path: Path, header: dict[str, object], data: bytes, message: str
) -> None:
    path = _safetensors(tmp_path / "bad.safetensors", header, data)

    with pytest.raises(IntegrityError, match=message):
        check_safetensors(path)


def test_check_safetensors_rejects_a_header_longer_than_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")

    with pytest.raises(IntegrityError, match="header claims"):
        check_safetensors(path)


def test_manifest_round_trips_sizes_and_hashes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.json").write_bytes(b"{}")
    (tmp_path / "sub" / "b.bin").write_bytes(b"abc")

    written = write_manifest(tmp_path, name="m", source="test", source_sha256="f" * 64)

    assert read_manifest(tmp_path) == written
    assert set(written.files) == {"a.json", "sub/b.bin"} and written.size_bytes == 5


@pytest.mark.parametrize("content", [None, "{not json", '{"name": "m"}'])
def test_unreadable_manifest_is_a_store_error(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / MANIFEST_NAME).write_text(content, encoding="utf-8")

    with pytest.raises(ModelStoreError, match=MANIFEST_NAME):
        read_manifest(tmp_path)
