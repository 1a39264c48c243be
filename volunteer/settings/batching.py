"""`BatchSettings`: serving many users at once: how a block server batches its sessions'
steps (continuous batching, `volunteer.server.step_batch`) and how many replies the
daemon's chat generates at once; a base of `Settings` (declared as its other fields are:
`volunteer.settings.spec`)."""

from __future__ import annotations

import dataclasses

from volunteer.settings import spec as s
from volunteer.settings.spec import setting


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchSettings:
    """How many sessions' steps, and how much memory, one batch may take; how many
    replies the daemon generates at once."""

    batch_max_sessions: int = setting(
        default=16,
        parse=s.whole_number(1, 1024),
        help="most sessions' steps a server runs as one batch (16; 1: no batching)",
        metavar="N",
    )
    """Steps of different sessions that wait at the same time run as one batch: the
    projections and MLPs as one matrix, attention per session. More wait for the next
    batch (those left out go first then)."""
    batch_max_mib: int = setting(
        default=256,
        parse=s.whole_number(1, 1 << 20),
        help="most working memory one batch of steps may take, in MiB (256)",
        metavar="MIB",
    )
    """Counted per step as float32 activations of its rows through one block and its
    attention scores (`volunteer.server.step_batch.step_bytes`); a single step always
    runs (its size is bounded by the request limits)."""
    prefill_chunk_tokens: int = setting(
        default=128,
        parse=s.whole_number(0, 1 << 20),
        help="positions of a long prompt computed per batch, between others' steps (128; 0: whole)",
        metavar="N",
    )
    """A prompt longer than this is computed in chunks of it, each in its own batch, so
    the people decoding beside it wait one chunk, not the whole prompt."""
    max_chats: int = setting(
        default=8,
        parse=s.whole_number(1, 1024),
        help="replies the daemon's chat generates at once, CLI, TUI and API together (8)",
        metavar="N",
    )
    """Each reply is a swarm session of its own; more replies wait for one to end. The
    servers batch the sessions' steps, so more at once cost each other little."""
