"""One LM head for a client's concurrent replies, which takes their rows together.

Each reply runs on its own thread and turns its last hidden state into logits once per
token. Done alone, that reads the whole head matrix for one row: on a CPU the head of a
small model costs as much as a server's span of blocks. Rows that come while the head is
busy wait, and the next call takes all of them as one matmul (continuous batching, as the
servers batch the blocks): nobody waits for a batch to form, only for the call under way.
A row's logits equal its logits alone (the rows of a matmul do not mix).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from volunteer.models.model import ModelEnds

MAX_ROWS = 64
"""The most rows one call takes (its logits are `MAX_ROWS` x vocabulary floats)."""


@dataclass(eq=False)
class _Rows:
    hidden: torch.Tensor
    logits: torch.Tensor | None = None
    error: BaseException | None = None

    @property
    def is_done(self) -> bool:
        return self.logits is not None or self.error is not None


class SharedHead:
    """`ModelEnds.logits` for many threads at once (module doc)."""

    def __init__(self, ends: ModelEnds) -> None:
        self.ends = ends
        self._ready = threading.Condition()
        """Guards the fields below; notified when a call ends."""
        self._waiting: list[_Rows] = []
        self._is_busy = False
        self.calls = 0
        """Head calls so far."""
        self.requests = 0
        """Requests answered so far (more than `calls` where rows went together)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, S, H] -> logits [B, S, vocab], computed with the rows of the
        threads that wait beside this one."""
        mine = _Rows(hidden)
        with self._ready:
            self._waiting.append(mine)
        while True:
            with self._ready:
                while self._is_busy and not mine.is_done:
                    self._ready.wait()
                if mine.is_done:
                    break
                # The head is free: this thread runs the next call (which holds its own
                # request unless more rows than a call takes came before it).
                taken = _first_rows(self._waiting, MAX_ROWS)
                self._waiting = self._waiting[len(taken) :]
                self._is_busy = True
            try:
                self._run(taken)
            finally:
                with self._ready:
                    for each in taken:
                        if not each.is_done:  # (interrupted: none may wait for it forever)
                            each.error = RuntimeError("the LM head call was interrupted")
                    self._is_busy = False
                    self.calls += 1
                    self.requests += len(taken)
                    self._ready.notify_all()
        if mine.error is not None:
            raise mine.error
        assert mine.logits is not None
        return mine.logits

    def _run(self, taken: list[_Rows]) -> None:
        """Sets every taken request's logits (or its error: one request's fault stays its
        own, as each then runs alone)."""
        try:
            outputs = self._compute([each.hidden for each in taken])
        except Exception as exc:
            if len(taken) == 1:
                taken[0].error = exc
                return
            for each in taken:
                self._run([each])
            return
        for each, output in zip(taken, outputs, strict=True):
            each.logits = output

    def _compute(self, hiddens: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(hiddens) == 1:
            with torch.inference_mode():
                return [self.ends.logits(hiddens[0])]
        width = hiddens[0].shape[-1]
        if any(each.dim() != 3 or each.shape[-1] != width for each in hiddens):
            raise ValueError("requests of different shapes cannot go together")
        rows = torch.cat([each.reshape(-1, width) for each in hiddens])
        with torch.inference_mode():
            logits = self.ends.logits(rows.unsqueeze(0)).squeeze(0)
        sizes = [each.shape[0] * each.shape[1] for each in hiddens]
        return [
            part.reshape(*each.shape[:2], -1)
            for part, each in zip(logits.split(sizes), hiddens, strict=True)
        ]


def _first_rows(waiting: list[_Rows], most: int) -> list[_Rows]:
    """The longest prefix of `waiting` within `most` rows (at least one request)."""
    taken, rows = [], 0
    for each in waiting:
        size = each.hidden.shape[0] * each.hidden.shape[1]
        if taken and rows + size > most:
            break
        taken.append(each)
        rows += size
    return taken
