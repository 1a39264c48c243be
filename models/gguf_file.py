"""Read and validate a GGUF file (llama.cpp's weight format) before anything trusts it.

GGUF files come from anyone's repository, so reading is defensive, in two passes:

1. A bounded walk over the header checks every declared length and count against the file
   size, the magic and version, the key/value types, each tensor's dimensions and type,
   the alignment, duplicate keys and names, and that every tensor's data lies inside the
   file without overlapping another. `gguf.GGUFReader` trusts declared counts: a forged
   array length makes it loop for ages, and a truncated string is silently cut short.
2. Only then does `gguf.GGUFReader` parse the file, for the metadata values and the
   memory-mapped tensor data that `gguf.quants.dequantize` turns into float32.

Any failure becomes a `CheckpointError` that names the file and tells the user to fetch
it again.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import struct
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from volunteer.models.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ARRAY_NESTING = 2
_MAX_ELEMENTS = 2**62  # far above any real tensor; keeps byte counts well inside int64

_SCALAR_BYTES = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in a GGUF file and how it is encoded."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    """Torch order: ggml's `ne` reversed, so a linear weight is [out_features, in_features]."""
    offset: int
    """Absolute byte offset of the tensor's data in the file."""
    n_bytes: int


class GGUFFile:
    """A validated GGUF file: plain-Python metadata, tensor infos, and lazy tensor data.

    Build it with `read_gguf`. The data stays memory-mapped until `close()` (or the end of a
    `with` block), so reading tensors one by one keeps memory use to one tensor at a time.
    """

    def __init__(
        self,
        *,
        path: Path,
        version: int,
        metadata: dict[str, Any],
        tensors: dict[str, GGUFTensorInfo],
        data: dict[str, np.ndarray],
    ) -> None:
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self._data = data

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drops the memory-mapped views, so the OS can unmap the file (needed on Windows)."""
        self._data = {}

    def raw_tensor(self, name: str) -> np.ndarray:
        """The tensor's undecoded bytes, memory-mapped and read-only (valid until `close()`)."""
        raw = self._data.get(name)
        if raw is None:
            raise RuntimeError(f"{self.path} was closed or has no tensor {name!r}")
        return raw

    def read_tensor(self, name: str) -> np.ndarray:
        """Dequantizes one tensor to a fresh, writable float32 array in torch order.

        Raises:
            CheckpointError: the file has no such tensor, or its type cannot be dequantized.
        """
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        if not can_dequantize(info.ggml_type):
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is stored as {info.ggml_type.name}, which we "
                f"cannot dequantize (supported: {', '.join(supported_type_names())})"
            )
        raw = self._data.get(name)
        if raw is None:
            raise RuntimeError(f"{self.path} was closed; read tensors inside its `with` block")
        try:
            values = gguf.quants.dequantize(raw, info.ggml_type).reshape(info.shape)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.path}: cannot dequantize {name!r}: {exc}") from exc
        if np.may_share_memory(values, raw):
            # F32 comes back as a view of the read-only map; callers get their own copy.
            values = values.copy()
        return np.ascontiguousarray(values, dtype=np.float32)


@functools.cache
def can_dequantize(ggml_type: GGMLQuantizationType) -> bool:
    """Whether `gguf.quants.dequantize` handles this tensor type (asked, not hard-coded)."""
    type_bytes = GGML_QUANT_SIZES[ggml_type][1]
    try:
        gguf.quants.dequantize(np.zeros(type_bytes, dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


def supported_type_names() -> list[str]:
    """Names of the tensor types `GGUFFile.read_tensor` can dequantize."""
    return [t.name for t in GGMLQuantizationType if t in GGML_QUANT_SIZES and can_dequantize(t)]


def read_gguf(path: Path) -> GGUFFile:
    """Opens and validates a GGUF file.

    Args:
        path: the `.gguf` file (a single file, not a split `-00001-of-0000N` set).

    Returns:
        The validated file; metadata values are plain str/int/float/bool/list.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt or not GGUF at all.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            if size == 0:
                raise _CorruptError("the file is empty")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                version, tensors = _scan(buf)
        reader = gguf.GGUFReader(path)
        metadata = {
            name: field.contents()
            for name, field in reader.fields.items()
            if not name.startswith("GGUF.")  # the reader's own header pseudo-fields
        }
        data = {t.name: t.data for t in reader.tensors}
        offsets = {t.name: t.data_offset for t in reader.tensors}
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist; pull the model again") from None
    except (
        _CorruptError,
        ValueError,  # includes UnicodeDecodeError
        KeyError,
        IndexError,
        TypeError,
        OverflowError,
        struct.error,
        OSError,
    ) as exc:
        raise CheckpointError(
            f"{path} is not a valid GGUF file (truncated or corrupt: {exc}); "
            "delete it and pull the model again"
        ) from exc
    if offsets != {name: info.offset for name, info in tensors.items()}:
        raise CheckpointError(f"{path}: gguf.GGUFReader disagrees with our header walk")
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors, data=data)


class _CorruptError(Exception):
    """Internal: what is wrong with the bytes; `read_gguf` adds the path and advice."""


class _Cursor:
    """Reads little-endian values from a buffer, never past its end."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def skip(self, n_bytes: int, what: str) -> int:
        start = self.pos
        if n_bytes > len(self.buf) - start:
            raise _CorruptError(
                f"{what} needs {n_bytes} bytes at offset {start}, "
                f"but the file ends at {len(self.buf)}"
            )
        self.pos = start + n_bytes
        return start

    def u32(self, what: str) -> int:
        value: int = struct.unpack_from("<I", self.buf, self.skip(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = struct.unpack_from("<Q", self.buf, self.skip(8, what))[0]
        return value

    def string(self, what: str) -> str:
        length = self.u64(what)
        start = self.skip(length, what)
        try:
            return self.buf[start : self.pos].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _CorruptError(f"{what} at offset {start} is not UTF-8") from exc


def _scan(buf: mmap.mmap) -> tuple[int, dict[str, GGUFTensorInfo]]:
    """Walks the whole header with bounds checks; returns the version and tensor infos."""
    cur = _Cursor(buf)
    magic = buf[: len(GGUF_MAGIC)]
    if magic != GGUF_MAGIC:
        raise _CorruptError(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}")
    cur.skip(len(GGUF_MAGIC), "magic")
    version = cur.u32("version")
    if version & 0xFFFF == 0:
        raise _CorruptError("big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise _CorruptError(f"GGUF version {version} is not supported ({SUPPORTED_VERSIONS})")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    alignment = _scan_metadata(cur, n_kv)
    raw = [_scan_tensor_info(cur) for _ in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for info in raw:
        if info.name in tensors:
            raise _CorruptError(f"duplicate tensor name {info.name!r}")
        if info.offset % alignment:
            raise _CorruptError(
                f"tensor {info.name!r} data offset {info.offset} is not a multiple of "
                f"the alignment {alignment}"
            )
        tensors[info.name] = dataclasses.replace(info, offset=data_start + info.offset)
    _check_layout(tensors.values(), len(buf))
    return version, tensors


def _scan_metadata(cur: _Cursor, n_kv: int) -> int:
    """Skips over the key/value section; returns `general.alignment` (or the default)."""
    keys: set[str] = set()
    alignment = DEFAULT_ALIGNMENT
    for index in range(n_kv):
        key = cur.string(f"metadata key {index}")
        if key in keys:
            raise _CorruptError(f"duplicate metadata key {key!r}")
        keys.add(key)
        value_type = _value_type(cur.u32(f"type of {key!r}"), key)
        if key == "general.alignment":
            if value_type != GGUFValueType.UINT32:
                raise _CorruptError("general.alignment must be a uint32")
            alignment = cur.u32(key)
            if alignment == 0 or alignment & (alignment - 1):
                raise _CorruptError(f"alignment {alignment} is not a power of two")
        else:
            _skip_value(cur, value_type, key, depth=0)
    return alignment


def _value_type(raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise _CorruptError(f"metadata {key!r} has unknown value type {raw}") from None


def _skip_value(cur: _Cursor, value_type: GGUFValueType, key: str, *, depth: int) -> None:
    if value_type in _SCALAR_BYTES:
        cur.skip(_SCALAR_BYTES[value_type], key)
    elif value_type == GGUFValueType.STRING:
        cur.skip(cur.u64(key), key)
    else:  # ARRAY, the only other type
        if depth >= _MAX_ARRAY_NESTING:
            raise _CorruptError(f"metadata {key!r} nests arrays too deeply")
        item_type = _value_type(cur.u32(key), key)
        count = cur.u64(key)
        if item_type in _SCALAR_BYTES:
            # One bounds check for the whole array, however large its declared count.
            cur.skip(count * _SCALAR_BYTES[item_type], key)
            return
        # Every string or array item takes at least 8 bytes, so this loop stays bounded by
        # the file size: a forged count fails at the end of the file.
        for _ in range(count):
            _skip_value(cur, item_type, key, depth=depth + 1)


def _scan_tensor_info(cur: _Cursor) -> GGUFTensorInfo:
    name = cur.string("tensor name")
    n_dims = cur.u32(f"tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _CorruptError(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
    ne = [cur.u64(f"tensor {name!r}") for _ in range(n_dims)]
    raw_type = cur.u32(f"tensor {name!r}")
    offset = cur.u64(f"tensor {name!r}")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block_size, type_bytes = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise _CorruptError(f"tensor {name!r} has unknown ggml type {raw_type}") from None
    n_elements = 1
    for dim in ne:
        n_elements *= dim
    if n_elements == 0 or n_elements > _MAX_ELEMENTS:
        raise _CorruptError(f"tensor {name!r} has an impossible shape {ne}")
    if ne[0] % block_size:
        raise _CorruptError(
            f"tensor {name!r} rows of {ne[0]} values do not fill whole {ggml_type.name} "
            f"blocks of {block_size}"
        )
    n_bytes = n_elements // block_size * type_bytes
    return GGUFTensorInfo(name, ggml_type, tuple(reversed(ne)), offset, n_bytes)


def _check_layout(tensors: Iterable[GGUFTensorInfo], file_size: int) -> None:
    """Each tensor's bytes lie inside the file and no two tensors share bytes."""
    end_of_previous, previous = 0, None
    for info in sorted(tensors, key=lambda t: t.offset):
        end = info.offset + info.n_bytes
        if end > file_size:
            raise _CorruptError(
                f"tensor {info.name!r} data ends at byte {end}, past the end of the "
                f"{file_size}-byte file"
            )
        if info.offset < end_of_previous:
            raise _CorruptError(f"tensors {previous!r} and {info.name!r} overlap")
        end_of_previous, previous = end, info.name
