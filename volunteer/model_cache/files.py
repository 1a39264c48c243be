"""Checks on the files of a Hugging Face-format model folder, and its manifest.

Every folder in the model cache holds `volunteer-manifest.json`: the model's name, where
it came from, and the size and sha256 of each file, so `verify` can re-hash the folder
and name the file that changed. Safetensors headers are parsed here (not trusted) so a
truncated or corrupt file is reported before torch tries to memory-map it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from volunteer.errors import IntegrityError, ModelStoreError
from volunteer.machine.atomic import write_file_atomic
from volunteer.model_cache.pypi_wheel import sha256_file
from volunteer.models.config import ModelConfig
from volunteer.models.errors import ModelConfigError

MANIFEST_NAME = "volunteer-manifest.json"
MANIFEST_FORMAT = 1

# A safetensors header is JSON; anything this large is an attack or garbage.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """Size and sha256 of one file of a cached model."""

    size_bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What `volunteer-manifest.json` records about a cached model folder."""

    name: str
    """The name the model is listed and resolved under."""
    source: str
    """Where it came from, for people: a wheel, a Hugging Face repo id, a GGUF path."""
    files: Mapping[str, FileRecord]
    """Relative path (with `/`) -> size and sha256, for every file but the manifest."""
    created: str
    """ISO 8601 UTC time the folder was built."""
    source_sha256: str | None = None
    """sha256 of the single source file (the GGUF) the folder was converted from."""

    @property
    def size_bytes(self) -> int:
        return sum(record.size_bytes for record in self.files.values())

    def to_json(self) -> str:
        raw: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "source": self.source,
            "created": self.created,
            "files": {
                rel: {"size": rec.size_bytes, "sha256": rec.sha256}
                for rel, rec in sorted(self.files.items())
            },
        }
        if self.source_sha256:
            raw["source_sha256"] = self.source_sha256
        return json.dumps(raw, indent=2) + "\n"


def write_manifest(
    folder: Path, *, name: str, source: str, source_sha256: str | None = None
) -> Manifest:
    """Hashes every file under `folder` and writes the manifest beside them."""
    files = {
        _rel(path, folder): FileRecord(path.stat().st_size, sha256_file(path))
        for path in _model_files(folder)
    }
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    manifest = Manifest(name, source, files, created, source_sha256)
    write_file_atomic(folder / MANIFEST_NAME, manifest.to_json().encode("utf-8"))
    return manifest


def read_manifest(folder: Path) -> Manifest:
    """Reads a folder's manifest.

    Raises:
        ModelStoreError: it is missing or malformed.
    """
    path = folder / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        files = {
            str(rel): FileRecord(int(rec["size"]), str(rec["sha256"]))
            for rel, rec in raw["files"].items()
        }
        return Manifest(
            name=str(raw["name"]),
            source=str(raw["source"]),
            files=files,
            created=str(raw.get("created", "")),
            source_sha256=raw.get("source_sha256"),
        )
    except FileNotFoundError:
        raise ModelStoreError(f"{path} is missing; the cached model is incomplete") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelStoreError(f"{path} is unreadable or malformed ({exc})") from exc


def check_manifest_files(
    folder: Path, manifest: Manifest, *, on_bytes: Callable[[int], None] | None = None
) -> int:
    """Re-hashes every file the manifest lists; returns the bytes checked.

    Raises:
        IntegrityError: a file is missing, has another size, or another sha256.
    """
    total = 0
    for rel, record in sorted(manifest.files.items()):
        path = folder / rel
        if not path.is_file():
            raise IntegrityError(f"{path} is missing")
        size = path.stat().st_size
        if size != record.size_bytes:
            raise IntegrityError(
                f"{path} has {size} bytes, expected {record.size_bytes} (truncated or altered)"
            )
        actual = sha256_file(path)
        if actual != record.sha256:
            raise IntegrityError(f"{path} has sha256 {actual}, expected {record.sha256}")
        total += size
        if on_bytes is not None:
            on_bytes(size)
    return total


def check_hf_folder(folder: Path, *, label: str | None = None) -> ModelConfig:
    """Checks that `folder` is a loadable Hugging Face-format model folder.

    Reads `config.json` and parses the header of every safetensors file.

    Args:
        folder: the folder to check.
        label: what to call the folder in messages (a model name instead of a
            staging path that is about to disappear); defaults to the path.

    Returns:
        The model's configuration.

    Raises:
        ModelStoreError: config.json is missing or lacks fields, the architecture is
            unsupported, or there are no safetensors weights.
        IntegrityError: a safetensors file is truncated or corrupt.
    """
    label = label or str(folder)
    try:
        config = ModelConfig.from_hf_folder(folder)
    except ModelConfigError as exc:
        raise ModelStoreError(
            f"{label} has an unusable config.json: {_no_path(exc, folder)} "
            f"(a complete Llama-family Hugging Face config is needed)"
        ) from exc
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelStoreError(
            f"{label} holds no *.safetensors weights (only safetensors checkpoints are "
            f"supported; .bin/.pt files are not loaded)"
        )
    for path in weights:
        check_safetensors(path, label=f"{label}/{path.name}")
    return config


def check_safetensors(path: Path, *, label: str | None = None) -> int:
    """Parses a safetensors header and checks the file holds exactly its tensors.

    Args:
        path: the file.
        label: what to call the file in messages; defaults to the path.

    Returns:
        The number of tensors in the file.

    Raises:
        IntegrityError: the header is malformed, or the data section is shorter or
            longer than the header's offsets say (a truncated or corrupt file).
    """
    label = label or str(path)
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise IntegrityError(f"{label} is truncated: it has no safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
            raise IntegrityError(
                f"{label} is truncated or corrupt: its header claims {header_len} bytes"
            )
        header_bytes = handle.read(header_len)
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{label} has a corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise IntegrityError(f"{label} has a corrupt safetensors header (not an object)")
    spans = [
        _tensor_span(label, name, entry) for name, entry in header.items() if name != "__metadata__"
    ]
    _check_spans(label, sorted(spans), file_size - 8 - header_len)
    return len(spans)


def _tensor_span(label: str, name: str, entry: Any) -> tuple[int, int, str]:
    try:
        begin, end = (int(v) for v in entry["data_offsets"])
        shape = [int(d) for d in entry["shape"]]
        dtype = str(entry["dtype"])
    except (TypeError, KeyError, ValueError) as exc:
        raise IntegrityError(f"{label}: tensor {name!r} has a malformed header entry") from exc
    if not 0 <= begin <= end or any(d < 0 for d in shape):
        raise IntegrityError(f"{label}: tensor {name!r} has invalid offsets or shape")
    bits = _DTYPE_BITS.get(dtype)
    # Unknown (future) dtypes are still checked for offsets, just not for their size.
    if bits is not None and end - begin != math.ceil(math.prod(shape) * bits / 8):
        raise IntegrityError(
            f"{label}: tensor {name!r} spans {end - begin} bytes, but a {dtype} tensor "
            f"of shape {shape} needs {math.ceil(math.prod(shape) * bits / 8)}"
        )
    return begin, end, name


def _check_spans(label: str, spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise IntegrityError(f"{label}: tensor {name!r} overlaps another or leaves a gap")
        cursor = end
    if cursor != data_bytes:
        state = "truncated" if cursor > data_bytes else "corrupt (trailing bytes)"
        raise IntegrityError(
            f"{label} is {state}: its tensors need {cursor} data bytes, the file has {data_bytes}"
        )


def _model_files(folder: Path) -> list[Path]:
    return sorted(
        path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST_NAME
    )


def _no_path(exc: Exception, folder: Path) -> str:
    # The config reader names the file by its full path; the label already says where.
    return str(exc).replace(str(folder / "config.json"), "config.json")


def _rel(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()
