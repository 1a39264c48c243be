"""Chat through the swarm, served to the CLI and the TUI over the control API.

The control method `chat` (streaming) takes a conversation and sampling options and
streams the reply's text. The daemon runs the client: the model's ends and tokenizer are
loaded on the first chat, each reply runs in a worker thread (torch work stays off the
event loop), and the swarm session runs on the daemon's loop next to the DHT. A client
that hangs up stops its reply after the current token. A request that names an adapter
is answered by what the daemon's `AdaptedChats` makes of the swarm chat (the fine-tuning
layer, which this one does not import).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from volunteer.chat.conversation import Conversation, ReplyStats, user_sampling
from volunteer.chat.stops import StopScanner
from volunteer.client.receipt_sender import ReceiptSender
from volunteer.client.swarm_client import SwarmClient
from volunteer.control.messages import (
    CHAT,
    ChatNotice,
    ChatRequest,
    ChatStats,
    ChatStatus,
    ChatText,
    RouteHop,
)
from volunteer.control.server import ControlServer
from volunteer.daemon.block_service import BlockService
from volunteer.daemon.dht_service import DHTService
from volunteer.daemon.local_checks import local_blocks
from volunteer.daemon.trust_service import TrustService
from volunteer.errors import SettingsError
from volunteer.machine.cpu_sharing import in_passing_thread
from volunteer.model_cache.served_model import open_model
from volunteer.model_cache.weights_hash import weights_hash
from volunteer.models.sampling import SamplingParams
from volunteer.paths import Paths
from volunteer.settings import Settings

if TYPE_CHECKING:
    from volunteer.chat.via_swarm import SwarmChat


class AdaptedChats(Protocol):
    """Makes the chat that answers with a stored adapter, on the daemon's swarm chat."""

    async def chat_for(self, name: str, base: SwarmChat) -> Any:
        """A chat with `base`'s `stream_reply` that runs adapter `name` (its errors are
        the caller's: a missing or incompatible adapter)."""
        ...


def _sampling(request: ChatRequest) -> SamplingParams:
    return user_sampling(
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        repetition_penalty=request.repetition_penalty,
        seed=request.seed,
    )


class ChatService:
    """Answers `chat` calls through the swarm (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        dht: DHTService,
        blocks: BlockService,
        trust: TrustService,
        *,
        receipts: Callable[[str], ReceiptSender] | None = None,
        adapters: AdaptedChats | None = None,
    ) -> None:
        """`receipts` makes the sender of the chats' receipts for a model (None: none);
        `adapters` answers requests that name an adapter (None: they are refused)."""
        self._trust = trust
        self._receipts = receipts
        self._adapters = adapters
        self._settings = settings
        self._paths = paths
        self._dht = dht
        self._blocks = blocks
        self._chat: SwarmChat | None = None
        self._loading = asyncio.Lock()
        self._slots = asyncio.Semaphore(settings.max_chats)
        self._is_running = False
        self._stops: set[threading.Event] = set()
        self._workers: set[asyncio.Future[None]] = set()
        """Replies under way (or waiting for a slot); one whose caller went away finishes
        after its next token, still held here."""
        self.replies = 0

    def register_control(self, control: ControlServer) -> None:
        """Adds the streaming control method `chat`."""
        control.register_stream(CHAT, self.chat)

    async def start(self) -> None:
        self._is_running = True

    async def stop(self) -> None:
        self._is_running = False  # replies waiting for a slot are refused
        for stop in list(self._stops):
            stop.set()
        if self._chat is not None:
            await self._chat.client.close()

    async def apply_settings(self, settings: Settings) -> None:
        """Takes on a new thread count: replies from now on run on it (each reply has a
        thread of its own); replies under way finish as they are."""
        self._settings = settings

    def status(self) -> ChatStatus:
        """Replies under way and replies given."""
        return ChatStatus(chats_active=len(self._stops), chats_answered=self.replies)

    async def chat(self, request: ChatRequest) -> AsyncIterator[ChatText | ChatNotice | ChatStats]:
        """Streams the reply to `request` in pieces of text (and notices of what it waits
        for, if the swarm has a hole), then what it took."""
        if request.model not in (None, self._settings.model):
            raise SettingsError(
                f"this daemon runs {self._settings.model}, not {request.model}; "
                f"chat with that model through `--swarm MULTIADDR`"
            )
        sampling = _sampling(request)
        chat: Any = await self._load()
        if not self._is_running:
            raise SettingsError("the daemon is stopping")
        if request.adapter is not None:
            if self._adapters is None:
                raise SettingsError("this daemon does not chat with adapters")
            chat = await self._adapters.chat_for(request.adapter, chat)
        conversation = Conversation(messages=[m.model_dump() for m in request.messages])
        if request.raw:
            conversation.raw_prompt = request.messages[-1].content
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        stats = ReplyStats()
        stop_texts = StopScanner(request.stop)  # callers cut the text; this ends the reply
        began = time.monotonic()
        threads = self._settings.thread_count

        def send(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, (kind, value))

        def answer() -> None:
            import torch  # loaded already: the daemon serves with it

            # OpenMP keeps a count per thread, and this thread is the reply's own.
            torch.set_num_threads(threads)
            try:
                for piece in chat.stream_reply(
                    conversation,
                    max_new_tokens=request.max_new_tokens,
                    sampling=sampling,
                    should_stop=stop.is_set,
                    stats=stats,
                    verify=request.verify,
                    notify=lambda notice: send("notice", notice),
                ):
                    send("text", piece)
                    stop_texts.push(piece)
                    if stop_texts.is_stopped:
                        break  # ends the reply: its session closes
                send("done", None)
            except BaseException as exc:  # handed to the awaiting control call
                send("error", exc)

        self._stops.add(stop)
        try:
            worker = asyncio.ensure_future(self._answer_in_a_slot(answer, send))
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
            while True:
                kind, value = await pieces.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    break
                yield ChatText(text=value) if kind == "text" else ChatNotice(notice=value)
            await worker
            self.replies += 1
            # The last message: what the reply took (chat UIs show it under the answer).
            yield ChatStats(
                tokens=stats.tokens,
                seconds=round(time.monotonic() - began, 3),
                route=[RouteHop(peer_id=p, start=s, end=e) for p, s, e in stats.route],
                prompt_tokens=stats.prompt_tokens,
                finish="length"
                if stats.tokens >= stats.max_tokens and not stop_texts.is_stopped
                else "stop",
            )
        finally:
            stop.set()  # a caller that went away stops the reply after this token
            self._stops.discard(stop)

    async def _answer_in_a_slot(
        self, answer: Callable[[], None], send: Callable[[str, Any], None]
    ) -> None:
        """Runs `answer` once one of the `max_chats` slots is free, on a thread of
        its own: a reply's OpenMP workers end with it, so they never slow the compute
        thread's prefills (see volunteer.machine.cpu_sharing.in_passing_thread)."""
        async with self._slots:
            if not self._is_running:
                send("error", SettingsError("the daemon is stopping"))
                return
            await in_passing_thread(answer)

    async def swarm_chat(self) -> SwarmChat:
        """The daemon's swarm chat (its client, loop, model ends and tokenizer), loaded on
        first use: what fine-tuning in the daemon runs on too."""
        return await self._load()

    async def _load(self) -> SwarmChat:
        # The tokenizer and chat templates (jinja2) load with the first chat, not with
        # every daemon: most daemons only serve blocks.
        from volunteer.chat.via_swarm import SwarmChat

        async with self._loading:
            if self._chat is None:
                model = self._blocks.model or await asyncio.to_thread(
                    open_model, self._settings.model, self._paths.models_dir
                )
                fmt = await asyncio.to_thread(lambda: self._blocks.fmt)
                client = SwarmClient(
                    p2p=self._dht.p2p,
                    node=self._dht.node,
                    model=model.swarm_name,
                    num_blocks=model.config.num_layers,
                    local_handler=lambda: self._blocks.handler,
                    # Only servers of the same weights as the model's ends run here.
                    weights_hash=await asyncio.to_thread(weights_hash, model.folder),
                    weights_format=fmt.label,
                    config=model.config,
                    verify=self._settings.verify,  # type: ignore[arg-type]  # checked
                    reputation=self._trust.reputation,
                    accuse=self._trust.accuse,
                    local_blocks=local_blocks(model, fmt, self._blocks),
                    repair_wait_s=self._settings.repair_wait_s,
                    receipts=self._receipts(model.swarm_name) if self._receipts else None,
                )
                self._chat = await in_passing_thread(
                    SwarmChat.load,
                    model.folder,
                    model.config,
                    client=client,
                    loop=asyncio.get_running_loop(),
                    fmt=fmt,
                )
            return self._chat
