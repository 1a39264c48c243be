"""What a daemon's chats check servers with (issue 15): its reputation file, and the
blocks it can compute itself, when no other replica is left to compare with or a third
computation must decide a mismatch.

The blocks it serves are used as they are. Others are loaded from the model's files
when they are small enough (`LOCAL_CHECK_MAX_BYTES`): on a large model a daemon does not
hold a second copy of a span just to check others; its checks then rely on replicas.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from volunteer.daemon.block_service import BlockService
from volunteer.daemon.span_plan import block_footprint
from volunteer.model_cache.served_model import ServedModel
from volunteer.models.checkpoint import load_span
from volunteer.models.model import BlockSpan
from volunteer.models.weight_format import WeightFormat
from volunteer.paths import Paths
from volunteer.trust.reputation import Reputation

REPUTATION_FILE = "reputation.sqlite3"
LOCAL_CHECK_MAX_BYTES = 1 << 30
"""The most weights a daemon loads to check others' blocks (one span at a time)."""


def open_reputation(paths: Paths) -> Reputation:
    """This daemon's record of the peers it checked (raises `ReputationStoreError`)."""
    return Reputation(paths.data_dir / REPUTATION_FILE)


def local_blocks(
    model: ServedModel, fmt: WeightFormat, blocks: BlockService | None = None
) -> Callable[[int, int], BlockSpan | None]:
    """Blocks [start, end) computed here in `fmt` (the form of the servers checked): the
    span `blocks` serves when it is exactly those, else loaded from the model's files
    (the last one kept) within `LOCAL_CHECK_MAX_BYTES`; None when too large. Blocks the
    caller: call it from a worker thread."""
    loaded: dict[tuple[int, int], BlockSpan] = {}
    lock = threading.Lock()

    def get(start: int, end: int) -> BlockSpan | None:
        handler = blocks.handler if blocks is not None else None
        if handler is not None and (handler.span.start, handler.span.end) == (start, end):
            return handler.span
        weights = block_footprint(model.config, fmt).weight_bytes * (end - start)
        if weights > LOCAL_CHECK_MAX_BYTES:
            return None
        with lock:
            if (start, end) not in loaded:
                loaded.clear()  # one span at a time
                span = load_span(model.folder, model.config, start, end, fmt=fmt)
                loaded[(start, end)] = span.eval()
            return loaded[(start, end)]

    return get
