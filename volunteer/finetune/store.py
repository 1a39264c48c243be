"""Named adapters: a fine-tuning run's trained tensors, kept on disk by name.

`<data_dir>/adapters/<NAME>/` holds `adapter.json` (an `AdapterInfo`) and
`adapter.safetensors` (the tensors that `adapter_info.expected_shapes` names).
`.checkpoints/<NAME>/` adds `optimizer.safetensors` and `progress.json` for a resumable
run. Folders are built under `.tmp-` names and renamed into place; reads are bounded and
checked (a crash, full disk or hand edit can leave anything). Errors are `AdapterError`s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import safetensors
import safetensors.torch
import torch

from volunteer.finetune.adapter_info import (
    AdapterError,
    AdapterInfo,
    check_shapes,
    check_tensors,
    shape_pattern,
    valid_name,
)
from volunteer.machine.atomic import TMP_PREFIX, publish_dir, remove_stale_tmp
from volunteer.models.config import ModelConfig
from volunteer.paths import Paths

MAX_JSON_BYTES = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024  # an adapter names at most 10 tensors: far below this
MAX_FREE_DIM_PER_HIDDEN = 64  # bounds the file of a LoRA whose widths are unknown
MAX_OPTIMIZER_PER_ADAPTER = 8  # optimizer file / adapter file, at most (Adam keeps 2)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
CHECKPOINTS = ".checkpoints"

Tensors = dict[str, torch.Tensor]
Checkpoint = tuple[AdapterInfo, Tensors, Tensors, dict[str, Any]]


class BrokenAdapter(NamedTuple):
    """A folder of the store that holds no valid adapter; `reason` says what is wrong."""

    name: str
    path: Path
    reason: str


class AdapterStore:
    """The named adapters and training checkpoints under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def of(cls, paths: Paths) -> AdapterStore:
        return cls(paths.data_dir / "adapters")

    def save(
        self, info: AdapterInfo, tensors: Mapping[str, torch.Tensor], *, replace: bool = False
    ) -> Path:
        """Writes an adapter atomically and returns its folder; AdapterError if the tensors
        do not fit `info`, the name is taken (unless `replace`) or the disk is full. A failed
        save keeps any earlier adapter of the name and leaves no temporary folder."""
        dest, label = self.root / valid_name(info.name), f"adapter {info.name}"
        check_tensors(info, tensors, label)
        if dest.exists() and not replace:
            raise AdapterError(f"{label} already exists (delete it first, or replace it)")
        _publish(dest, _adapter_files(info, tensors, label), replace=replace)
        return dest

    def load(self, name: str, *, config: ModelConfig | None = None) -> tuple[AdapterInfo, Tensors]:
        """An adapter's settings and tensors, checked against each other (and against
        `config`'s LoRA widths, when given); AdapterError if it is missing or damaged."""
        return _load_adapter(self._existing(name), f"adapter {name}", config)

    def info(self, name: str) -> AdapterInfo:
        """An adapter's settings (its tensors are not read)."""
        return _read_info(self._existing(name), f"adapter {name}")

    def list(self) -> list[AdapterInfo | BrokenAdapter]:
        """Every adapter, sorted by name, its files checked but its tensor data unread; a
        damaged one is a `BrokenAdapter`, not an error."""
        rows: list[AdapterInfo | BrokenAdapter] = []
        for entry in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if entry.name.startswith(".") or not entry.is_dir():
                continue  # temporary folders and the checkpoints
            try:
                info = _read_info(entry, f"adapter {entry.name}")
                _check_file(entry / "adapter.safetensors", info, f"adapter {entry.name}", None)
                rows.append(info)
            except (AdapterError, OSError) as exc:
                rows.append(BrokenAdapter(entry.name, entry, str(exc)))
        return rows

    def delete(self, name: str) -> Path:
        """Removes an adapter (AdapterError if there is none); returns its former folder."""
        folder = self._existing(name)
        shutil.rmtree(_aside(folder), ignore_errors=True)  # aside first: never half-deleted
        return folder

    def checkpoint_save(
        self,
        name: str,
        info: AdapterInfo,
        tensors: Mapping[str, torch.Tensor],
        optimizer: Mapping[str, torch.Tensor],
        progress: Mapping[str, Any],
    ) -> Path:
        """Writes, or atomically replaces, the resumable training checkpoint of `name`:
        `optimizer` is the optimizer's state as named tensors, `progress` JSON-able."""
        label = f"training checkpoint of {name}"
        if info.name != valid_name(name):
            raise AdapterError(f"{label}: its settings name adapter {info.name}")
        check_tensors(info, tensors, label)
        files = _adapter_files(info, tensors, label)
        files["optimizer.safetensors"] = safetensors.torch.save(_cpu_copies(optimizer))
        files["progress.json"] = _json_bytes(dict(progress), label)
        _publish(self.root / CHECKPOINTS / name, files, replace=True)
        return self.root / CHECKPOINTS / name

    def checkpoint_load(self, name: str) -> Checkpoint | None:
        """What `checkpoint_save` wrote, checked: (info, tensors, optimizer, progress);
        None if there is none, AdapterError if it is damaged."""
        folder, label = self.root / CHECKPOINTS / valid_name(name), f"training checkpoint of {name}"
        if not folder.is_dir():
            return None
        info, tensors = _load_adapter(folder, label, None)
        path = folder / "optimizer.safetensors"
        limit = MAX_OPTIMIZER_PER_ADAPTER * (folder / "adapter.safetensors").stat().st_size
        with _damaged(label, path):
            optimizer = safetensors.torch.load_file(_bounded(path, limit + MAX_HEADER_BYTES))
        progress = _read_json(folder / "progress.json", label)
        if not isinstance(progress, dict):
            raise AdapterError(f"{label}: progress.json is not a JSON object")
        return info, tensors, optimizer, progress

    def checkpoint_delete(self, name: str) -> bool:
        """Removes the training checkpoint of `name`; False if there was none."""
        folder = self.root / CHECKPOINTS / valid_name(name)
        if not folder.is_dir():
            return False
        shutil.rmtree(_aside(folder), ignore_errors=True)
        return True

    def _existing(self, name: str) -> Path:
        folder = self.root / valid_name(name)
        if not folder.is_dir():
            raise AdapterError(f"no adapter named {name} (see `volunteer adapters list`)")
        return folder


def _publish(dest: Path, files: Mapping[str, bytes], *, replace: bool) -> None:
    # Built beside `dest`, fsynced, renamed. A replaced folder is moved aside first (no
    # folder can be renamed over a full one) and moved back if ours fails to take its place.
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dest.name}-", dir=dest.parent))
    old = None
    try:
        for file_name, data in files.items():
            with open(tmp / file_name, "xb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        old = _aside(dest) if replace and dest.exists() else None
        if not publish_dir(tmp, dest):
            raise AdapterError(f"{dest.name} was saved by another process at the same time")
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise AdapterError(f"no space left on the disk to save {dest.name}") from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and dest.exists():
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            os.rename(old, dest)  # ours did not take its place: the earlier one comes back


def _adapter_files(
    info: AdapterInfo, tensors: Mapping[str, torch.Tensor], label: str
) -> dict[str, bytes]:
    return {
        "adapter.json": _json_bytes(info.to_json(), label),
        "adapter.safetensors": safetensors.torch.save(_cpu_copies(tensors)),
    }


def _cpu_copies(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    # Copies, since safetensors refuses tensors that share memory (a view of another one).
    return {key: t.detach().to("cpu", copy=True).contiguous() for key, t in tensors.items()}


def _json_bytes(value: dict[str, Any], label: str) -> bytes:
    try:
        data = json.dumps(value, indent=2, allow_nan=False).encode()
        if len(data) > MAX_JSON_BYTES:
            raise ValueError(f"it is over {MAX_JSON_BYTES} bytes")
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{label}: cannot be written as JSON: {exc}") from exc
    return data


def _aside(folder: Path) -> Path:
    moved = folder.with_name(f"{TMP_PREFIX}old-{folder.name}-{os.urandom(4).hex()}")
    os.rename(folder, moved)
    return moved


@contextlib.contextmanager
def _damaged(label: str, path: Path) -> Iterator[None]:
    """Turns a failure to read `path` into an AdapterError that names the file."""
    try:
        yield
    except (OSError, ValueError, safetensors.SafetensorError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise AdapterError(f"{label} is damaged: {path.name}: {why}") from exc


def _read_json(path: Path, label: str) -> Any:
    with _damaged(label, path), open(path, "rb") as source:
        data = source.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise ValueError(f"over {MAX_JSON_BYTES} bytes")
        return json.loads(data)  # a UnicodeDecodeError is a ValueError too


def _read_info(folder: Path, label: str) -> AdapterInfo:
    raw = _read_json(folder / "adapter.json", label)
    try:
        info = AdapterInfo.from_json(raw)
    except (AdapterError, TypeError) as exc:
        raise AdapterError(f"{label} is damaged: adapter.json: {exc}") from exc
    if info.name != folder.name:
        raise AdapterError(f"{label} is damaged: its adapter.json names {info.name}")
    return info


def _bounded(path: Path, limit: int) -> Path:
    # Checked before the library reads a byte, so its reads are bounded too.
    if path.stat().st_size > limit:
        raise ValueError(f"it is over {limit} bytes, more than its settings allow")
    return path


def _check_file(path: Path, info: AdapterInfo, label: str, config: ModelConfig | None) -> None:
    # The file's tensor names, dtypes and shapes, checked against `info` with no data read.
    # It may be no larger than those tensors in float64; the library checks that its header
    # covers it exactly.
    widest = MAX_FREE_DIM_PER_HIDDEN * info.hidden_size
    shapes = shape_pattern(info, config).values()
    numel = sum(math.prod(widest if d is None else d for d in shape) for shape in shapes)
    with (
        _damaged(label, path),
        safetensors.safe_open(_bounded(path, 8 + MAX_HEADER_BYTES + 8 * numel), "pt") as source,
    ):
        slices = {key: source.get_slice(key) for key in source.keys()}  # noqa: SIM118
        found = {key: (s.get_dtype(), tuple(s.get_shape())) for key, s in slices.items()}
    for key, (dtype, _) in found.items():
        if dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{label} is damaged: tensor {key} is {dtype}, not a float tensor")
    check_shapes(info, {k: shape for k, (_, shape) in found.items()}, f"{label} is damaged", config)


def _load_adapter(
    folder: Path, label: str, config: ModelConfig | None
) -> tuple[AdapterInfo, Tensors]:
    info = _read_info(folder, label)
    path = folder / "adapter.safetensors"
    _check_file(path, info, label, config)
    with _damaged(label, path):
        tensors = safetensors.torch.load_file(path)
    check_tensors(info, tensors, f"{label} is damaged", config)
    return info, tensors
