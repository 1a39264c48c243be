"""Chat through the swarm: token embedding and LM head here, every block in the swarm.

`SwarmChat.stream_reply` is synchronous (it runs in a worker thread, like local chat);
each reply opens one fault-tolerant session on the client's event loop, sized for the
prompt plus the reply, and closes it at the end however the reply ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from volunteer.chat.conversation import Conversation, ReplyStats, stream_reply
from volunteer.client.shared_head import SharedHead
from volunteer.client.stepper import SwarmStepper, open_swarm_stepper
from volunteer.client.swarm_client import SwarmClient
from volunteer.client.verification import Mode
from volunteer.models.checkpoint import load_ends
from volunteer.models.config import ModelConfig
from volunteer.models.model import ModelEnds
from volunteer.models.sampling import SamplingParams
from volunteer.models.tokenizer import Tokenizer
from volunteer.models.weight_format import WeightFormat, compress_head

OPEN_TIMEOUT_S = 120.0
"""Longest wait to read the swarm and open a route (including failovers), beyond the
client's wait for holes to be repaired (`SwarmClient.repair_wait_s`)."""
STEP_TIMEOUT_S = 120.0
"""Longest wait for one token's step through the whole route, failovers included (and
beyond the wait for a repair, as above)."""
CLOSE_TIMEOUT_S = 10.0


class SwarmChat:
    """A tokenizer and the model's ends here, answering through a `SwarmClient`.

    Args:
        ends: embedding and LM head of the model.
        tokenizer: its tokenizer.
        config: its config (context length).
        client: the swarm client, living on `loop`.
        loop: the running event loop of `client` (not the calling thread's).
    """

    def __init__(
        self,
        *,
        ends: ModelEnds,
        tokenizer: Tokenizer,
        config: ModelConfig,
        client: SwarmClient,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.ends = ends.eval()
        self.head = SharedHead(self.ends)
        """The LM head of every reply under way (their rows go through it together)."""
        self.tokenizer = tokenizer
        self.config = config
        self.client = client
        self.loop = loop
        self.notify: Callable[[str], None] | None = None
        """Told what a reply waits for, where `stream_reply` is given no `notify`."""

    @classmethod
    def load(
        cls,
        folder: Path,
        config: ModelConfig,
        *,
        client: SwarmClient,
        loop: asyncio.AbstractEventLoop,
        fmt: WeightFormat | None = None,
    ) -> SwarmChat:
        """Loads the ends and tokenizer of a Hugging Face-format folder (float32, or as
        local chat holds them in `fmt` if given, so that both pick the same tokens)."""
        dtype = torch.float32 if fmt is None else fmt.activation_dtype
        ends = load_ends(folder, config, dtype=dtype)
        if fmt is not None:
            compress_head(ends, fmt)
        tokenizer = Tokenizer.from_folder(folder)
        return cls(ends=ends, tokenizer=tokenizer, config=config, client=client, loop=loop)

    def stream_reply(
        self,
        conversation: Conversation,
        *,
        max_new_tokens: int,
        sampling: SamplingParams,
        should_stop: Callable[[], bool] = lambda: False,
        stats: ReplyStats | None = None,
        verify: Mode | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> Iterator[str]:
        """Streams the assistant's next reply as text pieces; it does not record it. The
        servers' steps are checked as `verify` says (None: as the client's `verify`);
        `notify` is told what the reply waits for while the swarm repairs a hole.

        Raises:
            SessionFailedError: no route covers the model, or the swarm failed mid-reply
                beyond what failover could mend.
        """
        steppers: list[SwarmStepper] = []

        @contextlib.contextmanager
        def open_noting_route(prompt_len: int, max_new: int) -> Iterator[SwarmStepper]:
            told = notify or self.notify
            with self._open_stepper(prompt_len, max_new, verify, told) as stepper:
                steppers.append(stepper)
                yield stepper

        yield from stream_reply(
            self.tokenizer,
            conversation,
            context_length=self.config.max_position_embeddings,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            open_stepper=open_noting_route,
            should_stop=should_stop,
            stats=stats,
        )
        if stats is not None and steppers:
            # The route that served the reply's last step (after any failover).
            routes = steppers[-1].session.route_history
            last = routes[-1] if routes else []
            stats.route = [(hop.peer_id, hop.start, hop.end) for hop in last]

    def _open_stepper(
        self,
        prompt_len: int,
        max_new_tokens: int,
        verify: Mode | None,
        notify: Callable[[str], None] | None,
    ) -> contextlib.AbstractContextManager[SwarmStepper]:
        repair_s = self.client.repair_wait_s
        return open_swarm_stepper(
            self.client,
            self.loop,
            self.ends,
            max_length=prompt_len + max_new_tokens,
            open_timeout_s=OPEN_TIMEOUT_S + repair_s,
            step_timeout_s=STEP_TIMEOUT_S + repair_s,
            close_timeout_s=CLOSE_TIMEOUT_S,
            verify=verify,
            notify=notify,
            head=self.head,
        )
