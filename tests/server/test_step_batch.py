"""Continuous batching on a server's compute thread (`volunteer.server.step_batch`).

Steps are queued while the compute thread is held by a job of its own, so that they all
wait at once; then it is let go, and what ran together is read from the batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
import torch
from volunteer.models.model import BlockSpan

from tests.server import random_span, tiny_config
from volunteer.server import step_batch
from volunteer.server.caps import BatchCaps
from volunteer.server.compute import PRIORITY_INFERENCE, PriorityCompute
from volunteer.server.sessions import Session
from volunteer.server.step_batch import StepBatcher, step_bytes

TOLERANCE = 1e-5
"""float32, relative to the output's scale (see tests/models/test_batched_step.py)."""
CAPS = BatchCaps(max_sessions=16, max_bytes=1 << 30, prefill_chunk=4)


@dataclasses.dataclass
class Bench:
    span: BlockSpan
    compute: PriorityCompute
    batcher: StepBatcher


def _bench(caps: BatchCaps = CAPS) -> Bench:
    span = random_span(tiny_config())
    compute = PriorityCompute()
    return Bench(span, compute, StepBatcher(compute, lambda: caps))


def _sizes_since(batcher: StepBatcher, batches_before: int) -> list[int]:
    """How many steps each batch since then held (at most the last `RECENT_BATCHES`)."""
    count = batcher.batches - batches_before
    return [len(sessions) for sessions in list(batcher.recent)[-count:]] if count else []


def _session(span: BlockSpan, name: str, peer: str = "peer-a", batch: int = 1) -> Session:
    session = Session(peer, name, span.start, span.end, batch, 64, span=span)
    session.cache = span.allocate_cache(batch_size=batch, max_length=64)
    return session


def _hidden(batch: int, seq: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, tiny_config().hidden_size, generator=generator)


def _alone(span: BlockSpan, history: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The last of `history`'s steps, run one by one through a cache of its own."""
    cache = span.allocate_cache(batch_size=history[0][0].shape[0], max_length=64)
    with torch.inference_mode():
        for hidden, start_pos in history:
            output = span(hidden, start_pos=start_pos, cache=cache)
            cache.length = start_pos + hidden.shape[1]
    return output


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= TOLERANCE * b.abs().max())


def _hold(compute: PriorityCompute) -> tuple[asyncio.Future, threading.Event, threading.Event]:
    """Holds the compute thread with a job of its own until the event is set."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait()

    holder = asyncio.ensure_future(compute.run(PRIORITY_INFERENCE, hold, peer="holder"))
    return holder, started, release


async def _held(bench: Bench, steps: Callable[[], list[Awaitable]]) -> list:
    """Runs `steps` while the compute thread is held, so that they wait together, then
    lets it go; returns their results (exceptions included)."""
    holder, started, release = _hold(bench.compute)
    while not started.is_set():
        await asyncio.sleep(0.01)
    tasks = [asyncio.ensure_future(step) for step in steps()]
    while bench.batcher.waiting < len(tasks):
        await asyncio.sleep(0.01)
    release.set()
    await holder
    return await asyncio.gather(*tasks, return_exceptions=True)


def _warm(bench: Bench, sessions: list[Session], lengths: list[int]) -> list[list]:
    """Prefills each session to its length, one at a time; returns their histories."""
    histories = []
    for seed, (session, length) in enumerate(zip(sessions, lengths, strict=True)):
        hidden = _hidden(session.batch_size, length, seed + 100)
        asyncio.run(bench.batcher.step(session, hidden, 0))
        histories.append([(hidden, 0)])
    return histories


def test_steps_that_wait_together_run_as_one_batch_and_equal_each_alone() -> None:
    bench = _bench()
    span = bench.span
    sessions = [
        _session(span, "decode"),
        _session(span, "later"),
        _session(span, "rewinds"),
        _session(span, "rows", batch=3),
    ]
    histories = _warm(bench, sessions, [3, 20, 12, 5])
    new = [
        (_hidden(1, 1, 1), 3),
        (_hidden(1, 1, 2), 20),
        (_hidden(1, 2, 3), 7),  # rewinds to position 7
        (_hidden(3, 1, 4), 5),
    ]
    fresh = _session(span, "prompt")  # a prompt of 10: chunks of 4, 4 and 2
    prompt = _hidden(1, 10, 5)
    batches = bench.batcher.batches

    async def run() -> list:
        def steps() -> list[Awaitable]:
            ongoing = [
                bench.batcher.step(session, hidden, pos)
                for session, (hidden, pos) in zip(sessions, new, strict=True)
            ]
            return [*ongoing, bench.batcher.step(fresh, prompt, 0)]

        return await _held(bench, steps)

    outputs = asyncio.run(run())
    for output, history, step in zip(outputs, histories, new, strict=False):
        assert _close(output, _alone(span, [*history, step]))
    assert _close(outputs[-1], _alone(span, [(prompt, 0)]))
    # The decode steps and the rewind (a step of 2 positions: a prompt) in one batch,
    # then the prompt's chunks, one per batch.
    assert _sizes_since(bench.batcher, batches) == [4, 1, 1, 1]
    assert bench.batcher.batches - batches == 4
    assert [s.cache.length for s in sessions] == [4, 21, 9, 6] and fresh.cache.length == 10
    # The batch's time was shared among the peers in it.
    assert bench.compute.used_by("peer-a") > 0


def test_a_session_that_goes_away_leaves_the_batch_without_disturbing_the_others() -> None:
    bench = _bench()
    span = bench.span
    sessions = [_session(span, name) for name in ("a", "b", "gone")]
    histories = _warm(bench, sessions, [4, 6, 8])
    new = [(_hidden(1, 1, seed), pos) for seed, pos in ((1, 4), (2, 6), (3, 8))]

    async def run() -> list:
        holder, _, release = _hold(bench.compute)
        tasks = [
            asyncio.ensure_future(bench.batcher.step(session, hidden, pos))
            for session, (hidden, pos) in zip(sessions, new, strict=True)
        ]
        while bench.batcher.waiting < 3:
            await asyncio.sleep(0.01)
        tasks[2].cancel()  # its client hung up
        await asyncio.wait([tasks[2]])
        assert bench.batcher.waiting == 2
        release.set()
        await holder
        return await asyncio.gather(*tasks[:2])

    outputs = asyncio.run(run())
    for output, history, step in zip(outputs, histories, new, strict=False):
        assert _close(output, _alone(span, [*history, step]))
    assert bench.batcher.largest == 2
    assert sessions[2].cache.length == 8  # never run


def test_a_step_that_fails_in_a_batch_fails_alone() -> None:
    bench = _bench()
    span = bench.span
    good = [_session(span, "a"), _session(span, "b")]
    histories = _warm(bench, good, [3, 5])
    broken = _session(span, "broken")
    broken.cache = span.allocate_cache(batch_size=1, max_length=2)  # too short for its step
    new = [(_hidden(1, 1, 1), 3), (_hidden(1, 1, 2), 5)]

    async def run() -> list:
        return await _held(
            bench,
            lambda: [
                *(bench.batcher.step(s, h, p) for s, (h, p) in zip(good, new, strict=True)),
                bench.batcher.step(broken, _hidden(1, 3, 3), 0),
            ],
        )

    *outputs, failure = asyncio.run(run())
    assert isinstance(failure, RuntimeError)
    for output, history, step in zip(outputs, histories, new, strict=True):
        assert _close(output, _alone(span, [*history, step]))


@pytest.mark.parametrize(
    ("caps", "batches"),
    [
        (dataclasses.replace(CAPS, max_sessions=2), [2, 2, 1]),
        (dataclasses.replace(CAPS, max_sessions=1), [1, 1, 1, 1, 1]),
        # No room beyond the first step: each runs alone.
        (dataclasses.replace(CAPS, max_bytes=1), [1, 1, 1, 1, 1]),
    ],
)
def test_the_caps_bound_each_batch_and_those_left_out_go_first(
    caps: BatchCaps, batches: list[int]
) -> None:
    bench = _bench(caps)
    span = bench.span
    sessions = [_session(span, f"s{index}", peer=f"peer-{index}") for index in range(5)]
    histories = _warm(bench, sessions, [2] * 5)
    new = [(_hidden(1, 1, seed), 2) for seed in range(5)]
    before = bench.batcher.batches
    outputs = asyncio.run(
        _held(
            bench,
            lambda: [bench.batcher.step(s, h, p) for s, (h, p) in zip(sessions, new, strict=True)],
        )
    )
    assert _sizes_since(bench.batcher, before) == batches
    for output, history, step in zip(outputs, histories, new, strict=True):
        assert _close(output, _alone(span, [*history, step]))


def test_step_bytes_counts_rows_and_attention_scores() -> None:
    span = random_span(tiny_config())
    decode = step_bytes(span, 1, 1, 0)
    assert step_bytes(span, 4, 1, 0) == 4 * decode
    assert step_bytes(span, 1, 1, 100) - decode == 4 * span.config.num_heads * 100


def test_prompts_that_come_together_take_turns_and_decodes_join_the_first() -> None:
    bench = _bench()
    span = bench.span
    decoding = [_session(span, "d0"), _session(span, "d1")]
    histories = _warm(bench, decoding, [5, 6])
    prompts = [_session(span, f"p{index}") for index in range(3)]
    texts = [_hidden(1, 3, seed) for seed in range(3)]
    decode_steps = [(_hidden(1, 1, 10), 5), (_hidden(1, 1, 11), 6)]
    before = bench.batcher.batches

    def steps() -> list[Awaitable]:
        started = [bench.batcher.step(s, text, 0) for s, text in zip(prompts, texts, strict=True)]
        decodes = [
            bench.batcher.step(s, h, p) for s, (h, p) in zip(decoding, decode_steps, strict=True)
        ]
        return [*started, *decodes]

    outputs = asyncio.run(_held(bench, steps))
    assert _sizes_since(bench.batcher, before) == [3, 1, 1]
    for output, text in zip(outputs[:3], texts, strict=True):
        assert _close(output, _alone(span, [(text, 0)]))
    for output, history, step in zip(outputs[3:], histories, decode_steps, strict=True):
        assert _close(output, _alone(span, [*history, step]))


class SlowSpan(BlockSpan):
    """Blocks whose every batch takes SLOW_S more, so that the last batch's time gives
    an idle server a gathering window of `MAX_GATHER_S`."""

    def weights_for(self, first: int, last: int):  # type: ignore[no-untyped-def]
        time.sleep(SLOW_S)
        return super().weights_for(first, last)


SLOW_S = 0.1


def _slow_bench() -> Bench:
    """A bench whose steps take SLOW_S per block: an idle server's wait for others is then
    `MAX_GATHER_S` (a share of a long last batch)."""
    full = random_span(tiny_config())
    span = SlowSpan(full.config, 0, full.config.num_layers)
    span.load_state_dict(full.state_dict())
    span.eval()
    compute = PriorityCompute()
    return Bench(span, compute, StepBatcher(compute, lambda: CAPS))


SPACING_S = 0.001
"""How far apart steps come back to an idle server in the tests of waiting for them."""


async def _one_after_another(
    batcher: StepBatcher, sessions: list[Session], spacing: float = SPACING_S
) -> None:
    """A step of each session at position 3, `spacing` seconds after the one before."""
    tasks = []
    for session in sessions:
        assert session.cache is not None
        session.cache.length = 3
        tasks.append(asyncio.ensure_future(batcher.step(session, _hidden(1, 1, 2), 3)))
        await asyncio.sleep(spacing)
    await asyncio.gather(*tasks)


def test_an_idle_server_waits_a_moment_for_the_last_batchs_sessions_to_come_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hundred times the ms the steps come apart: a busy test machine's timers run late.
    monkeypatch.setattr(step_batch, "MAX_GATHER_S", 100 * SPACING_S)
    bench = _slow_bench()
    batcher = bench.batcher
    sessions = [_session(bench.span, f"s{index}", peer=f"peer-{index}") for index in range(3)]
    _warm(bench, sessions, [2, 3, 4])
    asyncio.run(
        _held(bench, lambda: [batcher.step(s, _hidden(1, 1, 1), s.cache.length) for s in sessions])
    )
    assert len(batcher.recent[-1]) == 3

    # Back from the rest of their routes a few ms apart, to an idle server.
    asyncio.run(_one_after_another(batcher, sessions))
    assert len(batcher.recent[-1]) == 3  # one batch again, not the first alone


def test_an_idle_server_does_not_wait_for_the_sessions_of_other_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Steps far enough apart for the lone one to have started (a loaded machine starts a
    # job late), and a window in which waiting for the pair would have caught it.
    spacing = 20 * SPACING_S
    monkeypatch.setattr(step_batch, "MAX_GATHER_S", 10 * spacing)
    bench = _slow_bench()
    batcher = bench.batcher
    sessions = [_session(bench.span, f"s{index}", peer=f"peer-{index}") for index in range(3)]
    _warm(bench, sessions, [2, 2, 2])
    pair, lone = sessions[:2], sessions[2]
    asyncio.run(_held(bench, lambda: [batcher.step(s, _hidden(1, 1, 1), 2) for s in pair]))
    asyncio.run(batcher.step(lone, _hidden(1, 1, 1), 2))
    assert [len(each) for each in list(batcher.recent)[-2:]] == [2, 1]

    # The lone session first, then the pair, each a little after the one before.
    asyncio.run(_one_after_another(batcher, [lone, *pair], spacing))
    # The lone session ran at once (waiting for the pair would have taken all three in one
    # batch); the pair, which came while it ran, went together after it.
    assert [sorted(each) for each in list(batcher.recent)[-2:]] == [
        [lone.key],
        sorted(session.key for session in pair),
    ]


def test_steps_that_come_during_a_batch_wait_for_its_sessions_to_come_back() -> None:
    bench = _slow_bench()
    batcher = bench.batcher
    sessions = [
        _session(bench.span, name, peer=f"peer-{name}") for name in ("x1", "x2", "y1", "y2")
    ]
    _warm(bench, sessions, [2, 2, 2, 2])
    here, there = sessions[:2], sessions[2:]

    async def taking_turns() -> None:
        first = asyncio.gather(*(batcher.step(s, _hidden(1, 1, 1), 2) for s in here))
        while batcher.running != {s.key for s in here}:  # until their batch runs
            await asyncio.sleep(0.001)
        others = asyncio.gather(*(batcher.step(s, _hidden(1, 1, 2), 2) for s in there))
        await first
        # Back at once, as sessions whose route is short come back.
        await asyncio.gather(others, *(batcher.step(s, _hidden(1, 1, 3), 3) for s in here))

    asyncio.run(taking_turns())
    # Without waiting, the others would have run as soon as the first batch ended (the
    # first batch's leftover jobs would even have started them), and the first two after
    # them: turns, for ever.
    assert [len(each) for each in list(batcher.recent)[-2:]] == [2, 4]
