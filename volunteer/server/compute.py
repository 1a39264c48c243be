"""The block server's torch work and the one compute thread that runs it: inference
steps first, also in time (`volunteer.server.anticipation`), the peer that used least
compute lately first within a class, and a short decode step on the event loop when that
thread is idle (see `PriorityCompute`).

The compute thread touches nothing of the server's but its own queue: the jobs get their
session and tensors as arguments and return new tensors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from volunteer.models.adapters import SpanAdapter
from volunteer.models.kv_cache import KVCache
from volunteer.models.model import BlockSpan
from volunteer.server.anticipation import Anticipation
from volunteer.server.sessions import Session
from volunteer.transport.protocol import BusyError

PRIORITY_INFERENCE = 0
"""Inference steps: a person is waiting for the next token."""
PRIORITY_TRAINING = 1
"""forward/backward: throughput work that can wait behind a decode step."""
INLINE_MAX_S = 0.1
"""The longest decode step that may run on the event loop (see `PriorityCompute`): the
loop's other work (the DHT, other streams, the control socket) waits that long at most."""
SERVICE_HALF_LIFE_S = 4.0
"""How fast a peer's use of the compute thread is forgiven (see `ServiceTally`): long
enough to remember a flood between two of its calls, short enough that a peer that
stopped is a newcomer again within half a minute."""
MAX_TALLIED_PEERS = 4096
"""Peers whose recent use is remembered; past it the least loaded half is forgotten."""

Result = TypeVar("Result")


class ServiceTally:
    """Compute seconds each peer used recently, each second counting half as much
    `half_life_s` later. Not thread-safe: `PriorityCompute` holds its lock around it."""

    def __init__(
        self,
        *,
        half_life_s: float = SERVICE_HALF_LIFE_S,
        max_peers: int = MAX_TALLIED_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.half_life_s = half_life_s
        self.max_peers = max_peers
        self.clock = clock
        self._used: dict[str, tuple[float, float]] = {}
        """Per peer: its tally and when (`clock`) it was last brought up to date."""

    def __len__(self) -> int:
        return len(self._used)

    def of(self, peer: str, now: float | None = None) -> float:
        """The peer's decayed compute seconds (0 for one never seen or forgotten)."""
        seconds, at = self._used.get(peer, (0.0, 0.0))
        if not seconds:
            return 0.0
        elapsed = (self.clock() if now is None else now) - at
        return seconds * 0.5 ** (max(elapsed, 0.0) / self.half_life_s)

    def charge(self, peer: str, seconds: float) -> None:
        now = self.clock()
        self._used[peer] = (self.of(peer, now) + seconds, now)
        if len(self._used) > self.max_peers:
            # Forgetting a peer only makes it a newcomer again; the heaviest are kept.
            by_load = sorted(self._used, key=lambda each: self.of(each, now))
            for forgotten in by_load[: len(by_load) // 2]:
                del self._used[forgotten]


@dataclasses.dataclass(eq=False)
class _Job:
    priority: int
    order: int
    peer: str
    run: Callable[[], Any]
    future: Future[Any]


class PriorityCompute:
    """One compute thread that runs the most urgent queued job next.

    Most urgent: the lowest priority class (inference before training), then the peer
    that used the least compute lately (`ServiceTally`: least attained service first),
    then the oldest job. So an inference step queued behind a backlog of forward passes
    runs next, and an honest client's decode step, which costs little, runs before the
    queued jobs of a peer (or of each of its many identities) that keeps the thread
    busy. Long calls are split into short jobs by their callers
    (`volunteer.server.slices`), so a job that cannot jump the queue waits at most one;
    and right after an inference step, forward/backward jobs wait for the next step if
    it is due soon (`Anticipation`), so that a chat's step does not wait even for one.

    Each `run` queues its job and hands the single-worker pool a token; the worker, for
    each token, takes whichever job is most urgent at that moment. An idle server has a
    blocked thread and nothing polling.

    A short single-threaded decode step that finds the compute thread idle runs on the
    caller's thread (the event loop) instead: waking the sleeping compute thread and then
    the loop again costs two thread hand-offs per step, each with cold caches after the
    compute, and nothing else could run in between anyway. Steps measured slower than
    `inline_max_s` keep going to the compute thread, so the loop never stalls for long.
    """

    def __init__(
        self,
        *,
        threads: int | None = None,
        decode_threads: int | None = None,
        inline_max_s: float = INLINE_MAX_S,
        tally: ServiceTally | None = None,
        anticipation: Anticipation | None = None,
        cpu_cap: float | None = None,
    ) -> None:
        """
        Args:
            threads: torch threads for a job (None: what the thread starts with).
            decode_threads: torch threads for a job that asks for `decode=True` (a step of
                one position): where more threads do not make it faster, fewer leave
                the other cores to the rest of the swarm and the volunteer's machine.
            inline_max_s: the longest a decode step may take to run on the caller's
                thread when the compute thread is idle (0: never).
            tally: where each peer's use is counted (default: a fresh one).
            anticipation: the inference steps' pace (default: a fresh one; one with
                `max_window_s=0` never holds forward/backward work back).
            cpu_cap: the most cores the compute thread may keep busy on average (None:
                no cap): after a job on more threads than that, it rests long enough to
                bring the job's average down to the cap (BOINC's CPU throttling, by the
                volunteer's `max_cpu_percent`).
        """
        self.threads = threads
        self.decode_threads = decode_threads
        self.inline_max_s = inline_max_s
        self.cpu_cap = cpu_cap
        self._last_cost = (0.0, 1)
        """(seconds, threads) of the last job, for its rest."""
        self._resting = threading.Event()
        """Set on shutdown: a rest under way ends at once."""
        self.decode_s: float | None = None
        """How long the last decode step took (None: none ran yet)."""
        self.jobs_run = 0
        """Jobs run so far, inline ones included."""
        self._is_running = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="volunteer-compute")
        self._queue: list[_Job] = []
        self._lock = threading.Lock()
        """Guards the queue, `_is_running`, `jobs_run`, the tally and the anticipation."""
        self._queued = threading.Condition(self._lock)
        """Notified when a job is queued (a held-back job waits on it for a step)."""
        self._tally = tally or ServiceTally()
        self.anticipation = anticipation or Anticipation()
        self._order = itertools.count()
        self._is_shut_down = False

    @property
    def queued(self) -> int:
        """Jobs waiting for the compute thread (not counting the one it runs)."""
        with self._lock:
            return len(self._queue)

    @property
    def is_idle(self) -> bool:
        """Nothing running and nothing queued."""
        with self._lock:
            return not self._is_running and not self._queue

    def used_by(self, peer: str) -> float:
        """The peer's recent compute seconds, as the queue weighs them."""
        with self._lock:
            return self._tally.of(peer)

    async def run(
        self,
        priority: int,
        fn: Callable[..., Result],
        *args: Any,
        peer: str,
        decode: bool = False,
        charge: Callable[[], Sequence[str]] | None = None,
    ) -> Result:
        """Runs fn(*args) on the compute thread for `peer`, who is charged its time;
        lower priority numbers run first.

        Args:
            peer: who asked (a peer id; `LOCAL_PEER` for this process's own client).
            decode: the job is a one-position step (it runs on `decode_threads`).
            charge: who the job's time is shared among instead of `peer`, asked on the
                compute thread right after fn ran (a batch of several peers' steps).

        Raises:
            BusyError: the server is shutting down.
        """
        if self._is_shut_down:
            raise BusyError("server is shutting down")
        job_future: Future[Result] = Future()
        threads = (self.decode_threads if decode else None) or self.threads
        is_inference = priority == PRIORITY_INFERENCE
        if is_inference:
            with self._lock:
                self.anticipation.inference_arrived()

        def job() -> Result:
            # OpenMP keeps a count per thread: set here, on the running thread, per job.
            if threads is not None and torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            began = time.perf_counter()
            try:
                return fn(*args)
            finally:
                took = time.perf_counter() - began
                self._last_cost = (took, threads or torch.get_num_threads())
                payers = charge() if charge is not None else (peer,)
                if decode and payers:  # (a batch job that found its step run has none)
                    self.decode_s = took
                with self._lock:
                    for payer in payers:
                        self._tally.charge(payer, took / len(payers))
                    self.jobs_run += 1
                    if is_inference:
                        self.anticipation.inference_ended()

        if decode and self._may_inline():
            restore = torch.get_num_threads()
            try:
                return job()
            finally:
                if torch.get_num_threads() != restore:
                    torch.set_num_threads(restore)

        queued = _Job(priority, next(self._order), peer, job, job_future)
        with self._lock:
            self._queue.append(queued)
            self._queued.notify()
        self._pool.submit(self._run_most_urgent)
        try:
            return await asyncio.wrap_future(job_future)
        except asyncio.CancelledError:
            # Cancelling the awaiting request cancels a job that has not started yet,
            # and takes it out of the queue: a queue of dead jobs would keep the next
            # decode step off the event loop.
            with self._lock:
                if queued in self._queue:
                    self._queue.remove(queued)
            raise

    def _may_inline(self) -> bool:
        """Whether a decode step may run on the caller's thread now: it runs on one
        thread, the compute thread has nothing running or queued, and the last decode
        step was short enough."""
        if (self.decode_threads or self.threads) != 1 or self._rest_s(1.0, 1) > 0:
            # (A throttled step must rest after it, which the event loop cannot do.)
            # A second thread's OpenMP team would make libgomp put idle workers to sleep
            # sooner in both (see volunteer.machine.cpu_sharing.in_passing_thread).
            return False
        if self.decode_s is None or self.decode_s > self.inline_max_s:
            return False  # the first step goes to the compute thread and is timed there
        return self.is_idle

    def _take_most_urgent(self) -> _Job | None:
        """Removes and returns the most urgent job (the caller holds the lock)."""
        if not self._queue:
            return None
        now = self._tally.clock()
        # A linear pass: the caps keep the queue short (calls, sessions), and each
        # peer's tally decays with time, so no ordering kept between picks would last.
        used: dict[str, float] = {}
        for job in self._queue:
            if job.peer not in used:
                used[job.peer] = self._tally.of(job.peer, now)
        most_urgent = min(self._queue, key=lambda job: (job.priority, used[job.peer], job.order))
        self._queue.remove(most_urgent)
        return most_urgent

    def _run_most_urgent(self) -> None:
        with self._lock:
            while True:
                job = self._take_most_urgent()
                if job is None:
                    return
                if job.priority == PRIORITY_INFERENCE or self._is_shut_down:
                    break
                wait_s = self.anticipation.training_wait_s()
                if wait_s <= 0:
                    self.anticipation.training_started()
                    break
                # Back in the queue (its order kept) while a step may come; a step that
                # comes is taken first, and this token's job is left for the next token.
                self._queue.append(job)
                self._queued.wait(wait_s)
            self._is_running = True
        try:
            if not job.future.set_running_or_notify_cancel():
                return
            try:
                job.future.set_result(job.run())
            except BaseException as exc:  # handed to the awaiting request, which re-raises
                job.future.set_exception(exc)
            # After the reply is on its way; still "running", so no decode step inlines.
            self._resting.wait(self._rest_s(*self._last_cost))
        finally:
            with self._lock:
                self._is_running = False

    def _rest_s(self, took: float, threads: int) -> float:
        """The rest after a job of `took` seconds on `threads` threads under the cap."""
        cap = self.cpu_cap
        if cap is None or threads <= cap:
            return 0.0
        return took * (threads / cap - 1)

    def shutdown(self) -> None:
        """Cancels queued jobs; a running job finishes in the background."""
        self._is_shut_down = True
        self._resting.set()
        with self._lock:
            pending, self._queue = self._queue, []
            self._queued.notify_all()
        for job in pending:
            job.future.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


# The functions below run on the compute thread. Each takes the blocks [start, end) of
# the request, which lie inside the span; tensors come back in the dtype they came in.


def allocate_cache(span: BlockSpan, session: Session) -> KVCache:
    """A cache for the session's blocks, on the span's device and dtype."""
    if (session.start, session.end) == (span.start, span.end):
        return span.allocate_cache(batch_size=session.batch_size, max_length=session.max_length)
    weight = next(span.parameters())
    return KVCache.allocate(
        span.config,
        num_blocks=session.end - session.start,
        batch_size=session.batch_size,
        max_length=session.max_length,
        dtype=weight.dtype,
        device=weight.device,
    )


def run_blocks(
    span: BlockSpan,
    hidden: torch.Tensor,
    start: int,
    end: int,
    start_pos: int,
    cache: KVCache | None,
    adapter: SpanAdapter | None = None,
) -> torch.Tensor:
    """Blocks [start, end) of the span (model block numbers), with a request's adapter
    for exactly those blocks, if any."""
    first, last = start - span.start, end - span.start
    return span(hidden, start_pos=start_pos, cache=cache, first=first, last=last, adapter=adapter)


def to_span(span: BlockSpan, tensor: torch.Tensor) -> torch.Tensor:
    """A request tensor on the span's device and in its dtype."""
    weight = next(span.parameters())
    return tensor.to(device=weight.device, dtype=weight.dtype)


def to_request(result: torch.Tensor, request: torch.Tensor) -> torch.Tensor:
    """A result on the request's device and in its dtype."""
    # Back to the request's device (the CPU, for the wire) and dtype, still on the compute
    # thread: a GPU->CPU copy waits for the GPU, which the event loop must not.
    return result.detach().to(device=request.device, dtype=request.dtype)
