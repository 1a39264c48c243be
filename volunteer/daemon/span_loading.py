"""Loading the served span: in memory, or with its weights streamed from disk when it is
larger than the memory the volunteer let it take (the disk tier of FlexGen's offloading,
`volunteer.models.offload`).

The scheduler sizes a span it chooses to fit in memory; a span the volunteer set with
`--blocks` may not fit, and is then served from disk rather than refused: slower (each
token reads the span's weights again, from the page cache at best), but within the RAM
limit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import shutil
import sys
from pathlib import Path

import torch

from volunteer.model_cache.served_model import ServedModel
from volunteer.models.checkpoint import SafetensorsFolder, load_span
from volunteer.models.model import BlockSpan
from volunteer.models.offload import OffloadedSpan
from volunteer.models.weight_format import WeightFormat

logger = logging.getLogger(__name__)

OFFLOAD_DIR = "offload"
"""Under the cache folder: one folder per daemon identity, of its span's block files."""


def offload_folder(cache_dir: Path, peer_id: str) -> Path:
    """Where this daemon's span streams from. Left over by a daemon that was killed, it
    is emptied here first: its files belong to no running span."""
    folder = cache_dir / OFFLOAD_DIR / peer_id
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def load_served_span(
    model: ServedModel,
    start: int,
    end: int,
    *,
    threads: int,
    fmt: WeightFormat,
    offload_to: Path | None = None,
) -> BlockSpan:
    """Blocks [start, end) in `fmt`: in memory, or (with `offload_to`) written there
    block by block as they load and streamed back while serving. Blocks: call it off
    the event loop, on a thread that may set torch's thread count."""
    torch.set_num_threads(threads)
    if offload_to is None:
        span = load_span(model.folder, model.config, start, end, fmt=fmt)
        _give_back_freed_heap()  # compressing leaves the float copies' chunks behind
        return span
    config = model.config
    files = SafetensorsFolder.open(model.folder)

    def one_block(index: int) -> torch.nn.Module:
        return load_span(files, config, index, index + 1, fmt=fmt).blocks[0]

    span = OffloadedSpan.build(config, start, end, offload_to, one_block)
    _give_back_freed_heap()
    logger.info("blocks %d:%d stream from %s (larger than the RAM limit)", start, end, offload_to)
    return span


def close_span(span: BlockSpan) -> None:
    """Stops an offloaded span's reader and deletes its files (others: nothing to do)."""
    if isinstance(span, OffloadedSpan):
        span.close()


def _give_back_freed_heap() -> None:
    """Returns the heap that loading block by block freed to the OS: glibc keeps freed
    chunks below its mmap threshold, several MiB per block, counted as resident."""
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return
