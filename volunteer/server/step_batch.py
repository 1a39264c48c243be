"""Continuous batching: inference steps of different sessions that wait at the same time
run as one batch through the span (`volunteer.models.batched_step`).

Each step is queued as an entry, and as a job of its session's peer on the compute
thread (`PriorityCompute`, so the peers' fair order still decides whose job runs next).
Whichever of those jobs runs first takes every waiting entry it may, up to the caps,
and runs them together; the jobs of the entries it took are then cancelled unrun. A step
that arrives while a batch runs is in the next one: it waits for the running batch to
end (it could not start sooner), and the leftover jobs of steps already run start
nothing. Then a step waits a moment (a share of the last batch's time, a few ms at most)
for the sessions likely to come back at once: its batchmates (the other sessions of its
last batch), which come back a little apart, and the sessions of the batch that just
ended, which come back after their route's turn; so groups that would otherwise take
turns on the server, each arriving while the other computes, merge. Such waits are
made while they pay: nobody waits a step's time, and sessions whose routes are long are
not waited for.

- Caps: at most `batch_max_sessions` entries, and at most `batch_max_bytes` of working
  memory by `step_bytes`; the first entry always runs (its size was checked on arrival).
- Fairness: an entry left out of a batch is ahead of every entry that has been left out
  less often, then the peer that used least compute lately, then the oldest; so nothing
  starves, and a batch's time is shared among the peers in it.
- A batch holds one prompt (a step of several positions) at most, and any number of
  decode steps. A prompt longer than `prefill_chunk` positions goes as chunks of that
  many, one per batch, so it delays the decodes beside it by one chunk at most; and
  prompts that come together run one after another, each server starting the next while
  the one before goes on along its route (batching prompts saves little: a prompt's
  matrices are large already), so the first user's first token does not wait for
  everyone's prompt.
- Only entries on the same blocks run together (a session keeps the blocks it opened on
  after a move).
- A session that goes away while its entry waits is taken out of the queue; one whose
  entry is in a running batch is computed and dropped, the others untouched. A batch that
  fails is run again one entry at a time, so an error is its own session's only.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import math
import threading
import time
from collections.abc import Callable

import torch

from volunteer.models.batched_step import StepPart, span_step_batch
from volunteer.models.model import BlockSpan
from volunteer.server.caps import BatchCaps
from volunteer.server.compute import (
    PRIORITY_INFERENCE,
    PriorityCompute,
    run_blocks,
    to_request,
    to_span,
)
from volunteer.server.sessions import Session

GATHER_SHARE = 0.25
"""An idle server waits for a step's batchmates to come back at most this share of the
last batch's time: a step never waits long for others."""
MAX_GATHER_S = 0.005
"""... and never longer than this: the steps it waits for come in a burst (pushed by the
previous server's batch, or sent by a client's threads), within a millisecond or two."""
SETTLE_TURNS = 3
"""Turns of the event loop an idle server lets pass before a step decides whether to
wait: a batch computed on the event loop's thread (`PriorityCompute` runs short steps
inline) holds up the reading of steps that arrived meanwhile, and these turns let them
reach the queue and join the step's batch."""
RECENT_BATCHES = 8
"""How many last batches `StepBatcher.recent` remembers."""
WORTH_WEIGHT = 0.2
"""The weight of the newest wait in the moving share of waits that brought a step."""
MAX_BATCH_WAIT_S = 30.0
"""A step that came while a batch runs waits at most this for its end before going on
(only a hung compute thread takes so long: the step's own job would wait as long)."""
MIN_WORTH = 0.25
"""Below this share, waiting has stopped paying (sessions that take turns along a route
rather than come together): a server then waits only once in `PROBE_EVERY` times, to
see whether it pays again."""
PROBE_EVERY = 8
FLOAT_BYTES = 4
"""Activations are counted as float32, the widest a block computes in."""


@dataclasses.dataclass(eq=False)
class _Entry:
    session: Session
    hidden: torch.Tensor
    start_pos: int
    order: int
    wake: asyncio.Future[None]
    skipped: int = 0
    output: torch.Tensor | None = None
    error: BaseException | None = None
    is_done: bool = False

    @property
    def blocks(self) -> tuple[int, int, int]:
        return (id(self.session.span), self.session.start, self.session.end)


def step_bytes(span: BlockSpan, batch: int, seq: int, start_pos: int) -> int:
    """Working memory of one session's step in a batch: each row's activations through
    a block (residual, norm, q/k/v, attention output, gate/up and their product) and its
    attention scores over every earlier position."""
    config = span.config
    qkv = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    per_row = 4 * config.hidden_size + qkv + 3 * config.intermediate_size
    scores = config.num_heads * seq * (start_pos + seq)
    return FLOAT_BYTES * batch * (seq * per_row + scores)


class StepBatcher:
    """Runs inference steps in batches on a server's compute thread (module doc)."""

    def __init__(self, compute: PriorityCompute, caps: Callable[[], BatchCaps]) -> None:
        """`caps` is asked at each step and batch (the handler's current settings)."""
        self._compute = compute
        self._caps = caps
        self._lock = threading.Lock()
        """Guards `_waiting` and the entries' results (set on the compute thread)."""
        self._waiting: list[_Entry] = []
        self._order = itertools.count()
        self.batches = 0
        """Batches run so far."""
        self.batched_steps = 0
        """Steps run in a batch of two or more so far."""
        self.largest = 0
        """The most sessions one batch held so far."""
        self._gather_s = 0.0
        """How long an idle server's first step waits for others (`_gather`)."""
        self._gather_worth = 1.0
        """The moving share of waits that brought another step (`_gather`)."""
        self._gathers = 0
        self.recent: collections.deque[set[tuple[str, str]]] = collections.deque(
            maxlen=RECENT_BATCHES
        )
        """The sessions of each of the last batches, oldest first."""
        self._mates: dict[tuple[str, str], frozenset[tuple[str, str]]] = {}
        """The other sessions of each session's last batch (`_gather` waits for them)."""
        self._running: frozenset[tuple[str, str]] | None = None
        """The sessions of the batch on the compute thread now (None: none runs)."""
        self._ended: tuple[frozenset[tuple[str, str]], float] = (frozenset(), -math.inf)
        """The sessions of the last batch, and when (`time.monotonic`) it ended."""
        self._ended_watchers: list[tuple[frozenset[tuple[str, str]], asyncio.Future[None]]] = []
        """Steps waiting in `_gather` for the running batch to end (event loop only)."""
        self._watchers: list[asyncio.Future[None]] = []
        """Steps waiting in `_gather`, told of each arrival (event loop only)."""

    def forget(self, key: tuple[str, str]) -> None:
        """A session closed: `_gather` no longer waits for its steps."""
        with self._lock:
            for sessions in self.recent:
                sessions.discard(key)
            self._mates.pop(key, None)
            ended, at = self._ended
            self._ended = (ended - {key}, at)
            for other, mates in self._mates.items():
                if key in mates:
                    self._mates[other] = mates - {key}

    @property
    def running(self) -> frozenset[tuple[str, str]]:
        """The sessions of the batch on the compute thread now (empty: none runs)."""
        return self._running or frozenset()

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    async def step(self, session: Session, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        """The session's step (new positions [start_pos, start_pos + S)) through its
        blocks and cache, batched with the steps that wait beside it; the cache's length
        is start_pos + S after it."""
        chunk = self._caps().prefill_chunk
        seq = hidden.shape[1]
        if not chunk or seq <= chunk:
            return await self._run(session, hidden, start_pos)
        outputs = []
        for begin in range(0, seq, chunk):
            piece = hidden.narrow(1, begin, min(chunk, seq - begin))
            outputs.append(await self._run(session, piece, start_pos + begin))
        return torch.cat(outputs, dim=1)

    async def _run(self, session: Session, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        entry = _Entry(session, hidden, start_pos, next(self._order), loop.create_future())
        with self._lock:
            self._waiting.append(entry)
        for watcher in self._watchers:
            if not watcher.done():
                watcher.set_result(None)
        self._watchers.clear()
        try:
            await self._gather(entry)
            while not self._is_done(entry):
                await self._run_a_batch_or_see_it_done(entry)
        finally:
            with self._lock:
                if entry in self._waiting:  # cancelled while waiting: leaves the queue
                    self._waiting.remove(entry)
        if entry.error is not None:
            raise entry.error
        assert entry.output is not None
        return entry.output

    async def _gather(self, entry: _Entry) -> None:
        """Waits a moment for the sessions likely to come back at once, so that they run
        together (module doc): the entry's batchmates (the other sessions of its last
        batch), and the sessions of the batch that just ended, which come back after
        their route's turn. A step that comes while a batch runs waits for it to end
        first (it could not start sooner). Bounded by `GATHER_SHARE` of the last batch's
        time and `MAX_GATHER_S`, and skipped while waiting does not pay (`MIN_WORTH`)."""
        if self._gather_s <= 0:
            return
        # (Before looking at the running batch: the compute thread finishes the
        # bookkeeping of the batch that woke this step only after waking it.)
        for _ in range(SETTLE_TURNS):
            await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        if (running := self._running) is not None:
            ended = loop.create_future()
            self._ended_watchers.append((running, ended))
            with self._lock:  # (a batch that ended meanwhile has woken nobody)
                is_running = self._running is running
            try:
                if is_running:
                    await asyncio.wait_for(ended, MAX_BATCH_WAIT_S)
            except TimeoutError:
                return
            finally:
                if (running, ended) in self._ended_watchers:
                    self._ended_watchers.remove((running, ended))
        # (Other work on the compute thread, or the leftover job of a step already run,
        # does not stop the wait: this step's job would queue behind it anyway.)
        if self._is_done(entry):
            return
        key = entry.session.key
        with self._lock:
            expected = (self._mates.get(key, frozenset()) | self._last_ended()) - {key}
        before = missing = self._missing(expected)
        if not missing:
            return
        self._gathers += 1
        if self._gather_worth < MIN_WORTH and self._gathers % PROBE_EVERY:
            return
        deadline = loop.time() + self._gather_s
        while missing and (remaining := deadline - loop.time()) > 0:
            watcher = loop.create_future()
            self._watchers.append(watcher)
            try:
                await asyncio.wait_for(watcher, remaining)
            except TimeoutError:
                break
            missing = self._missing(expected)
        self._gather_worth += WORTH_WEIGHT * ((missing < before) - self._gather_worth)

    def _last_ended(self) -> frozenset[tuple[str, str]]:
        """The sessions of the last batch, if it ended within the gathering window (the
        caller holds the lock)."""
        keys, ended_at = self._ended
        return keys if time.monotonic() - ended_at <= self._gather_s else frozenset()

    def _missing(self, mates: frozenset[tuple[str, str]]) -> int:
        with self._lock:
            return len(mates - {each.session.key for each in self._waiting})

    def _is_done(self, entry: _Entry) -> bool:
        with self._lock:
            return entry.is_done

    async def _run_a_batch_or_see_it_done(self, entry: _Entry) -> None:
        """Queues a batch job for the entry's peer and waits until the entry was run,
        by that job or by another's; the job is cancelled if it has not started then."""
        batch, seq, _ = entry.hidden.shape
        payers: list[str] = []
        job = asyncio.ensure_future(
            self._compute.run(
                PRIORITY_INFERENCE,
                self._run_waiting,
                entry,
                payers,
                peer=entry.session.peer,
                decode=batch * seq == 1,
                charge=lambda: payers,
            )
        )
        try:
            await asyncio.wait({job, entry.wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not job.done():
                job.cancel()
                await asyncio.wait({job})  # (raises nothing of the job's; a cancel of ours)
        if not job.cancelled() and job.exception() is not None:
            raise job.exception()  # type: ignore[misc]  # the compute thread's (shutdown)

    # On the compute thread from here.

    def _run_waiting(self, own: _Entry, payers: list[str]) -> None:
        """Takes the most urgent waiting entries the caps allow and runs them together;
        nothing if the job's own entry ran already (its job, left in the queue a moment,
        must not start a batch of steps that are still gathering)."""
        loop = own.wake.get_loop()
        with self._lock:
            if own.is_done:
                return
        taken = self._take()
        if not taken:
            return
        keys = frozenset(entry.session.key for entry in taken)
        with self._lock:
            self._running = keys
        payers.extend(entry.session.peer for entry in taken)
        results: list[torch.Tensor | BaseException]
        began = time.perf_counter()
        try:
            results = list(self._compute_batch(taken))
        except Exception as exc:
            # Set on the entries, never raised: the job that ran them may be another's.
            results = [exc]
        if len(taken) > 1 and isinstance(results[0], Exception):
            results = []  # one entry's fault must be its own: each runs alone
            for entry in taken:
                try:
                    results.extend(self._compute_batch([entry]))
                except Exception as exc:
                    results.append(exc)
        with self._lock:
            for entry, result in zip(taken, results, strict=True):
                if isinstance(result, BaseException):
                    entry.error = result
                else:
                    entry.output = result
                entry.is_done = True
            self.batches += 1
            self.largest = max(self.largest, len(taken))
            self.recent.append(set(keys))
            self._running = None
            self._ended = (keys, time.monotonic())
            for key in keys:
                self._mates[key] = keys - {key}
            took = time.perf_counter() - began
            self._gather_s = min(GATHER_SHARE * took, MAX_GATHER_S)
            if len(taken) > 1:
                self.batched_steps += len(taken)
        for entry in taken:
            loop.call_soon_threadsafe(_wake, entry.wake)
        loop.call_soon_threadsafe(self._batch_ended, keys)

    def _batch_ended(self, keys: frozenset[tuple[str, str]]) -> None:
        """On the event loop: wakes the steps that wait for the end of the batch of
        `keys` (the next may have begun: the compute thread does not wait for this)."""
        waiting = []
        for batch, watcher in self._ended_watchers:
            if batch is not keys:
                waiting.append((batch, watcher))
            elif not watcher.done():
                watcher.set_result(None)
        self._ended_watchers = waiting

    def _take(self) -> list[_Entry]:
        caps = self._caps()
        used = {}
        with self._lock:
            if not self._waiting:
                return []
            for entry in self._waiting:
                used.setdefault(entry.session.peer, self._compute.used_by(entry.session.peer))
            ranked = sorted(
                self._waiting, key=lambda e: (-e.skipped, used[e.session.peer], e.order)
            )
            blocks = ranked[0].blocks
            taken: list[_Entry] = []
            room = caps.max_bytes
            has_prompt = False
            for entry in ranked:
                if len(taken) >= caps.max_sessions or entry.blocks != blocks:
                    continue
                span = entry.session.span
                assert span is not None
                seq = entry.hidden.shape[1]
                size = step_bytes(span, entry.hidden.shape[0], seq, entry.start_pos)
                if taken and (size > room or (seq > 1 and has_prompt)):
                    continue
                room -= size
                has_prompt = has_prompt or seq > 1
                taken.append(entry)
            for entry in self._waiting:
                if entry not in taken:
                    entry.skipped += 1
            self._waiting = [entry for entry in self._waiting if entry not in taken]
        return taken

    def _compute_batch(self, taken: list[_Entry]) -> list[torch.Tensor]:
        session = taken[0].session
        span = session.span
        assert span is not None
        parts = []
        for entry in taken:
            cache = entry.session.cache
            assert cache is not None  # set when the session was admitted
            parts.append(StepPart(to_span(span, entry.hidden), entry.start_pos, cache))
        start, end = session.start, session.end
        with torch.inference_mode():
            if len(parts) == 1:  # the span's own forward (which a span may override)
                (part,) = parts
                outputs = [run_blocks(span, part.hidden, start, end, part.start_pos, part.cache)]
            else:
                first, last = start - span.start, end - span.start
                outputs = span_step_batch(span, parts, first=first, last=last)
        results = []
        for entry, output in zip(taken, outputs, strict=True):
            # A start_pos below the old length rewinds: later positions are overwritten.
            assert entry.session.cache is not None
            entry.session.cache.length = entry.start_pos + entry.hidden.shape[1]
            results.append(to_request(output, entry.hidden))
        return results


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
