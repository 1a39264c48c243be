"""What a block server has done, in total and per client awaiting a receipt.

`ServeStats` counts requests and positions for `volunteer status`. Its `WorkLog` keeps,
per client, the positions of each inference session and of its forward and backward
calls that no receipt covers yet (`volunteer.trust.receipts`): a receipt is taken only
for work this server did for that client, and at most for as much (`claim`). The log is
bounded: the least recently used entries go first (their work then earns no receipt).
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from volunteer.server.local_stream import LOCAL_PEER

MAX_ENTRIES = 8192
"""Sessions and call tallies awaiting a receipt, over all clients."""


class WorkLog:
    """Positions served per (client, kind, session) that no receipt covers yet; calls
    are tallied under the session id ""."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._open: collections.OrderedDict[tuple[str, str, str], int] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, peer: str, kind: str, session_id: str, tokens: int) -> None:
        key = (peer, kind, session_id)
        self._open[key] = self._open.get(key, 0) + tokens
        self._open.move_to_end(key)
        while len(self._open) > self.max_entries:
            self._open.popitem(last=False)

    def served(self, peer: str, kind: str, session_id: str) -> int:
        return self._open.get((peer, kind, session_id), 0)

    def claim(self, peer: str, kind: str, session_id: str, tokens: int) -> int | None:
        """Takes `tokens` of the work logged for this key: what was logged (an inference
        session is claimed once, whole), or None where less was logged.

        Work that came over a local link (`LOCAL_PEER`: a client of this machine's user)
        is claimed by whoever names its session: ids are random, and the receipt's
        signature names the client."""
        session_id = session_id if kind == "inference" else ""
        key = (peer, kind, session_id)
        if key not in self._open:
            key = (LOCAL_PEER, kind, session_id)
        logged = self._open.get(key)
        if logged is None or tokens > logged:
            return None
        if kind == "inference" or tokens == logged:
            del self._open[key]
        else:
            self._open[key] = logged - tokens
        return logged


@dataclasses.dataclass
class ServeStats:
    """What this server has done since it started (for `volunteer status` and the TUI)."""

    requests: int = 0
    """Requests answered: forward and backward calls, and inference steps."""
    tokens: int = 0
    """Positions run through the span (batch * sequence, summed over requests)."""
    pushed_steps: int = 0
    """Inference steps run from a push of the previous server, before the client sent them."""
    work: WorkLog = dataclasses.field(default_factory=WorkLog)

    def count(self, hidden: torch.Tensor, peer: str, kind: str, session_id: str = "") -> None:
        tokens = hidden.shape[0] * hidden.shape[1]
        self.requests += 1
        self.tokens += tokens
        self.work.add(peer, kind, session_id, tokens)
