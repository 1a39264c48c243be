"""The generation loop's step function, with the blocks running in the swarm.

The loop (`volunteer.models.generation.generate_tokens`) is synchronous and runs in a worker
thread; the swarm session lives on the event loop that owns the P2P connections. Each
step embeds tokens locally, sends the hidden states through the session on that loop,
and turns the returned hidden states into logits with the local LM head — the same
`ModelEnds` computation as local chat, so greedy output can match it token for token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

import torch

from volunteer.client.inference import SwarmInferenceSession
from volunteer.client.loop_bridge import run_on_loop
from volunteer.client.shared_head import SharedHead
from volunteer.client.swarm_client import SwarmClient
from volunteer.models.model import ModelEnds
from volunteer.scheduler.verification import Mode


class SwarmStepper:
    """A `StepFn` whose blocks run remotely through a `SwarmInferenceSession`."""

    def __init__(
        self,
        *,
        ends: ModelEnds,
        session: SwarmInferenceSession,
        loop: asyncio.AbstractEventLoop,
        step_timeout_s: float,
        head: SharedHead | None = None,
    ) -> None:
        """`head`: the LM head shared with concurrent steppers (None: `ends` alone)."""
        self.ends = ends
        self.session = session
        self.loop = loop
        self.step_timeout_s = step_timeout_s
        self.logits = head.logits if head is not None else ends.logits

    def __call__(self, input_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        with torch.inference_mode():
            hidden = self.ends.embed(input_ids)
        # The session retries failed peers itself; this bound covers a whole step
        # including failovers, so a hung swarm cannot hang the caller forever.
        hidden = run_on_loop(
            self.session.step(hidden, start_pos),
            self.loop,
            timeout_s=self.step_timeout_s,
            what=f"the step at position {start_pos}",
        )
        with torch.inference_mode():
            return self.logits(hidden[:, -1:])[:, -1]


@contextlib.contextmanager
def open_swarm_stepper(
    client: SwarmClient,
    loop: asyncio.AbstractEventLoop,
    ends: ModelEnds,
    *,
    max_length: int,
    open_timeout_s: float,
    step_timeout_s: float,
    close_timeout_s: float,
    verify: Mode | None = None,
    notify: Callable[[str], None] | None = None,
    head: SharedHead | None = None,
) -> Iterator[SwarmStepper]:
    """A step function over a fresh session of `client` (living on `loop`) for up to
    `max_length` positions, checked as `verify` says (None: as the client's); `notify` is
    told what it waits for while the swarm repairs a hole. The session is closed at
    exit, however the block ends. `head` is the LM head shared with concurrent replies."""
    session = run_on_loop(
        client.open_session(max_length=max_length, verify=verify, notify=notify),
        loop,
        timeout_s=open_timeout_s,
        what="opening a route through the swarm",
    )
    try:
        yield SwarmStepper(
            ends=ends, session=session, loop=loop, step_timeout_s=step_timeout_s, head=head
        )
    finally:
        with contextlib.suppress(Exception):  # the caller's own outcome matters more
            run_on_loop(session.close(), loop, timeout_s=close_timeout_s, what="closing")
