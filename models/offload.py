"""The disk tier of FlexGen-style offloading: a span whose projections live on disk.

Each block's four projection weights go to a file of their own (safetensors), as held
(plain, `Q4Weight`, `Int8Weight`), and are streamed back while the span computes: a
thread reads block i + 1 while block i runs. Norms, biases and RoPE stay resident. A
weight read back is the very one written, so outputs equal the in-memory span's.

Reads are plain file reads into fresh memory, freed once the block has run (pages of a
memory map kept open would count against the process). Each read must find the header
and size written, so a removed, truncated or overwritten file raises `CheckpointError`
naming it. Bytes flipped inside tensor data go unseen: a checksum would cost more than
the read, and the files live only as long as the span that wrote them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn
from volunteer.models.block import BlockWeights
from volunteer.models.config import ModelConfig
from volunteer.models.errors import CheckpointError
from volunteer.models.int8_weight import Int8Weight
from volunteer.models.model import BlockSpan
from volunteer.models.q4_weight import Q4Weight
from volunteer.models.quant import CompressedWeight, QuantError
from volunteer.models.rope import RotaryTable
from volunteer.models.weight_format import PROJECTIONS

FILE_FORMAT = "volunteer-offload/1"
DEFAULT_READ_TIMEOUT_S = 300.0
"""A block read that takes longer means a hung disk, not a slow one."""

_FIELDS = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down"}
"""Projection module name -> its field in `BlockWeights`."""


@dataclasses.dataclass
class StreamStats:
    """What a span has streamed from disk (bench counters; only grow)."""

    blocks_read: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    """Time spent reading, on the read-ahead thread (or inline without read-ahead)."""
    wait_s: float = 0.0
    """Time the compute thread stood waiting for a read: what overlap did not hide."""

    @property
    def read_bytes_per_s(self) -> float:
        return self.bytes_read / self.read_s if self.read_s > 0 else 0.0


class OnDiskWeight:
    """Stands in a block for a projection held on disk, so that a block's `weights()`
    names its shape and a stray use of it fails clearly."""

    def __init__(self, shape: torch.Size, path: Path) -> None:
        self.shape = shape
        self.path = path

    @property
    def nbytes(self) -> int:
        return 0  # none of it in memory

    def linear(
        self, x: torch.Tensor, bias: torch.Tensor | None, *, exact_dtype: bool = True
    ) -> torch.Tensor:
        raise RuntimeError(f"this weight is on disk ({self.path}): run the OffloadedSpan")


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int
    """Byte range in the data after the prefix."""


@dataclasses.dataclass(frozen=True)
class _BlockFile:
    """One block's file as written: what every read of it must find again."""

    path: Path
    prefix: bytes
    """Header length and header, byte for byte."""
    size_bytes: int
    entries: tuple[_Entry, ...]
    layouts: dict[str, dict[str, Any]]
    """Projection name -> kind ("tensor", "q4", "int8"), shape and group size."""


class _Read(NamedTuple):
    projections: dict[str, torch.Tensor | CompressedWeight]
    """`BlockWeights` field -> weight."""
    nbytes: int
    read_s: float


class OffloadedSpan(BlockSpan):
    """A `BlockSpan` whose projections are read from disk block by block as it runs.

    Resident: norms, biases, RoPE, and at most `read_ahead + 2` blocks' projections
    during a forward (the block computing, the one just done until the caller lets it
    go, and those read ahead). Under autograd the graph keeps every block's weights
    alive; the bound holds for inference.

    `forward` must be called from one thread at a time (the daemon's compute thread),
    and not at the same time as `close`.
    """

    def __init__(
        self,
        config: ModelConfig,
        start: int,
        end: int,
        *,
        read_ahead: int = 1,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> None:
        """Build on the meta device, then fill with `build` (or use `offload_span`)."""
        super().__init__(config, start, end)
        if read_ahead < 0:
            raise ValueError(f"read_ahead must be 0 or more, not {read_ahead}")
        self.read_ahead = read_ahead
        self.read_timeout_s = read_timeout_s
        self._files: list[_BlockFile] = []
        self._stats = StreamStats()
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"offload-read-{start}-{end}"
        )
        self._is_closed = False

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        start: int,
        end: int,
        folder: Path,
        load_block: Callable[[int], nn.Module],
        *,
        read_ahead: int = 1,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> OffloadedSpan:
        """Blocks [start, end), loaded one at a time by `load_block(index)` (a loaded
        `TransformerBlock`, projections in any format), written to `folder` at once, so
        memory never holds more than one block's projections.

        A daemon loading a span too big for its memory passes one block of `load_span`::

            files = SafetensorsFolder.open(model_folder)
            span = OffloadedSpan.build(
                config, start, end, scratch_folder,
                lambda i: load_span(files, config, i, i + 1, fmt=fmt).blocks[0],
            )

        (or of `load_span_gguf`), serves it like any span, and calls `span.close()` when
        it drops it. `scratch_folder` should hold one span's files only.

        Raises:
            OSError: the folder cannot be written (full disk, permissions).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            span = cls(config, start, end, read_ahead=read_ahead, read_timeout_s=read_timeout_s)
        try:
            for offset, index in enumerate(range(start, end)):
                block = load_block(index)
                path = folder / f"block-{index:05d}.safetensors"
                span._files.append(_offload_block(block, path))
                span.blocks[offset] = block
        except BaseException:
            span.close()
            raise
        norm = next(span.parameters())  # block 0's first norm
        span.rotary = RotaryTable(config).to(device=norm.device, dtype=norm.dtype)
        span.forget_weights()
        return span

    @property
    def stream_stats(self) -> StreamStats:
        """A copy of the counters so far."""
        return dataclasses.replace(self._stats)

    def weights_for(self, first: int, last: int) -> Iterable[BlockWeights]:
        if self._is_closed:
            raise RuntimeError(f"offloaded span {self.start}:{self.end} is closed")
        # The resident tensors, with placeholders where the projections go.
        resident = list(super().weights_for(0, self.num_blocks))
        return self._stream(resident, first, last)

    def _stream(
        self, resident: list[BlockWeights], first: int, last: int
    ) -> Iterator[BlockWeights]:
        pending: deque[concurrent.futures.Future[_Read]] = deque()
        following = first
        try:
            for index in range(first, last):
                if self.read_ahead == 0:
                    read = self._read_block(index, resident[index].attn_norm)
                    self._stats.wait_s += read.read_s
                else:
                    # This block and the next `read_ahead` ones are queued, in order,
                    # on the one read thread.
                    while following < min(last, index + 1 + self.read_ahead):
                        norm = resident[following].attn_norm
                        pending.append(self._reader.submit(self._read_block, following, norm))
                        following += 1
                    read = self._wait(pending.popleft(), index)
                # Only the compute thread writes the counters: no lock needed.
                self._stats.blocks_read += 1
                self._stats.bytes_read += read.nbytes
                self._stats.read_s += read.read_s
                got = read.projections
                yield resident[index]._replace(
                    qkv=got["qkv"], o=got["o"], gate_up=got["gate_up"], down=got["down"]
                )
                del read, got  # the caller's reference is then the last one
        finally:
            # A forward that stopped early (an error) leaves reads queued or under way:
            # their results go with the futures.
            for future in pending:
                future.cancel()

    def _wait(self, future: concurrent.futures.Future[_Read], index: int) -> _Read:
        began = time.perf_counter()
        try:
            return future.result(timeout=self.read_timeout_s)
        except concurrent.futures.TimeoutError as exc:
            path = self._files[index].path
            raise CheckpointError(
                f"reading {path} took over {self.read_timeout_s:.0f} s: is the disk hung?"
            ) from exc
        finally:
            self._stats.wait_s += time.perf_counter() - began

    def _read_block(self, index: int, norm: torch.Tensor) -> _Read:
        """Block `index`'s projections, on the device and (plain weights) dtype of the
        block's resident norm `norm`."""
        began = time.perf_counter()
        block_file = self._files[index]
        tensors = _read_file(block_file)
        projections = {
            _FIELDS[name]: _rebuild(name, layout, tensors, block_file.path, norm)
            for name, layout in block_file.layouts.items()
        }
        return _Read(projections, block_file.size_bytes, time.perf_counter() - began)

    def close(self) -> None:
        """Stops the read-ahead thread (waiting for a read under way) and deletes the
        block files; the span cannot run after this."""
        self._is_closed = True
        self._reader.shutdown(wait=True, cancel_futures=True)
        for block_file in self._files:
            block_file.path.unlink(missing_ok=True)


def offload_span(
    span: BlockSpan,
    folder: Path,
    *,
    read_ahead: int = 1,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
) -> OffloadedSpan:
    """Moves a loaded span's projections to disk, one file per block in `folder`.

    Consumes `span`: its blocks move to the returned span with their projections
    dropped from memory, so `span` itself cannot run any more.
    """
    offloaded = OffloadedSpan.build(
        span.config,
        span.start,
        span.end,
        folder,
        lambda index: span.blocks[index - span.start],
        read_ahead=read_ahead,
        read_timeout_s=read_timeout_s,
    )
    span.forget_weights()
    offloaded.rotary = span.rotary  # as the span had it (dtype, device, length)
    return offloaded


def _offload_block(block: nn.Module, path: Path) -> _BlockFile:
    """Writes the block's projections to `path` and puts placeholders in their place."""
    tensors: dict[str, torch.Tensor] = {}
    layouts: dict[str, dict[str, Any]] = {}
    for outer, inner in PROJECTIONS:
        layer = getattr(getattr(block, outer), inner)
        kind, held, group_size = _held(layer.weight)
        layouts[inner] = {"kind": kind, "shape": list(layer.weight.shape), "group_size": group_size}
        tensors.update({f"{inner}.{part}": t for part, t in held.items()})
    metadata = {"format": FILE_FORMAT} | {name: json.dumps(v) for name, v in layouts.items()}
    block_file = _write_file(path, tensors, metadata, layouts)
    for outer, inner in PROJECTIONS:
        layer = getattr(getattr(block, outer), inner)
        shape = layer.weight.shape
        del layer.weight  # the parameter (or compressed weight), and its memory with it
        layer.weight = OnDiskWeight(shape, path)
    return block_file


def _held(weight: torch.Tensor | CompressedWeight) -> tuple[str, dict[str, torch.Tensor], int]:
    """(kind, tensors as held, group size) of one projection weight."""
    if isinstance(weight, torch.Tensor):
        return "tensor", {"weight": weight.detach()}, 0
    if isinstance(weight, Q4Weight):
        return "q4", weight.held_tensors(), weight.group_size
    if isinstance(weight, Int8Weight):
        return "int8", {"codes": weight.codes, "scale": weight.scale}, weight.group_size
    raise TypeError(f"cannot offload a projection held as {type(weight).__name__}")


def _write_file(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    layouts: dict[str, dict[str, Any]],
) -> _BlockFile:
    """Writes `tensors` atomically and notes what a read must find again."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata)  # written from the tensors' memory: no copy
    with open(tmp, "rb") as f:
        prefix = f.read(8)
        prefix += f.read(int.from_bytes(prefix, "little"))
        size = os.fstat(f.fileno()).st_size
    # No fsync: the files do not outlive the span that wrote them, and this process
    # reads them back through the page cache it wrote them into.
    os.replace(tmp, path)
    header = json.loads(prefix[8:])
    entries = []
    for name, t in tensors.items():
        start, end = header[name]["data_offsets"]
        # safetensors orders tensors widest first: each is aligned for its dtype.
        assert start % t.element_size() == 0, f"{name} is misaligned in {path}"
        entries.append(_Entry(name, t.dtype, tuple(t.shape), start, end))
    return _BlockFile(path, prefix, size, tuple(entries), layouts)


def _read_file(block_file: _BlockFile) -> dict[str, torch.Tensor]:
    """Every tensor of a block file, read into fresh memory."""
    path = block_file.path
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != block_file.size_bytes:
                raise CheckpointError(
                    f"offloaded block file {path} is {size} bytes, not the "
                    f"{block_file.size_bytes} written: truncated or overwritten"
                )
            prefix = bytearray(len(block_file.prefix))
            _read_into(f, memoryview(prefix), path)
            if prefix != block_file.prefix:
                raise CheckpointError(
                    f"offloaded block file {path} has a header other than the one written"
                )
            # One allocation per block, not one per tensor: freed whole, it goes back
            # to the system (far above malloc's mmap threshold), where smaller ones
            # would be kept in a fragmented heap, resident though unused.
            data = torch.empty(size - len(prefix), dtype=torch.uint8)
            _read_into(f, data.numpy().data, path)
    except OSError as exc:
        raise CheckpointError(f"cannot read offloaded block file {path}: {exc}") from exc
    return {
        entry.name: data[entry.start : entry.end].view(entry.dtype).view(entry.shape)
        for entry in block_file.entries
    }


def _read_into(f: io.FileIO, view: memoryview, path: Path) -> None:
    done = 0
    while done < len(view):
        count = f.readinto(view[done:])
        if not count:
            raise CheckpointError(f"offloaded block file {path} ended early: truncated")
        done += count


def _rebuild(
    name: str,
    layout: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    path: Path,
    norm: torch.Tensor,
) -> torch.Tensor | CompressedWeight:
    """One projection weight from its held tensors, on the norm's device."""
    held = {key.split(".", 1)[1]: t for key, t in tensors.items() if key.startswith(name + ".")}
    shape = tuple(layout["shape"])
    try:
        if layout["kind"] == "tensor":
            # Plain weights follow the span's dtype, as `.to()` would have cast them.
            return held["weight"].to(device=norm.device, dtype=norm.dtype)
        if layout["kind"] == "q4":
            if "cpu_packed" not in held:  # (the CPU kernel's layout can only load there)
                held = {key: t.to(norm.device) for key, t in held.items()}
            weight = Q4Weight.from_held(held, shape=shape, group_size=layout["group_size"])
            return weight.to(norm.device)
        on_device = {key: t.to(norm.device) for key, t in held.items()}
        return Int8Weight(on_device["codes"], on_device["scale"], group_size=layout["group_size"])
    except QuantError as exc:
        raise CheckpointError(f"{name} in offloaded block file {path}: {exc}") from exc
