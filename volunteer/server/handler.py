"""The block server's RPC handlers on hivemind P2P: info, forward, backward, inference.

Wire shapes (envelopes and schemas are in `volunteer.transport.protocol`):

- `rpc_info`: unary; replies with `InfoReply` metadata.
- `rpc_forward` / `rpc_backward`: one `ExpertRequest` in (over a stream, so large
  tensors are not bound by the daemon's 4 MiB unary limit), one `ExpertResponse` out.
  Metadata `SpanRequest`; tensors: hidden [B, S, H] (backward: plus grad of outputs).
- `BlockHandler.rpc_inference`: a bidirectional stream in hivemind's framing, served
  as a plain stream (see `volunteer.server.inference_stream`).
- `BlockHandler.push` (a plain stream, not an RPC): steps that the previous server of a
  route pushes to one of our sessions (see `volunteer.server.push`); never answered.

Decisions:

- A request names blocks [start, end); they must lie inside the served span (a sub-span
  is allowed, so routes may use part of a server).
- Tensors arrive as float32 or the server's dtype; they are computed in the server's
  dtype and answered in the dtype they came in.
- B <= max_batch, S <= max_chunk and B * S <= max_tokens for every request; a session's
  max_length is at most the model's context (`volunteer.server.validation`).
- A step's start_pos may equal the cached length (the next step) or be below it (a
  rewind: the client replays from there, e.g. after failing over); never above it.
- Any bad request raises an error whose text names the reason; hivemind sends that text
  to the caller, and the server goes on serving everyone else.
- What a stranger may hold (sessions, calls, push streams, message bytes, backward
  positions, session lifetime) is capped per peer and in total (`volunteer.server.caps`);
  compute goes to the peer that used least lately, and long calls run in short slices.
- Steps of different sessions that wait at once run as one batch, and long prompts in
  chunks between them (`volunteer.server.step_batch`).
"""

from __future__ import annotations

import asyncio
import functools
import time
import typing

import torch
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

import volunteer.transport.protocol as wire
from volunteer.models.model import BlockSpan
from volunteer.server import validation
from volunteer.server.calls import serve_call
from volunteer.server.caps import DEFAULT_CAPS, PeerSlots, Refusals, ServerCaps, serve_in_slot
from volunteer.server.compute import (
    PRIORITY_INFERENCE,
    PriorityCompute,
    allocate_cache,
)
from volunteer.server.drill import Drill
from volunteer.server.inference_stream import serve_inference_stream
from volunteer.server.local_stream import LocalInferenceStream
from volunteer.server.penalty_box import PenaltyBox
from volunteer.server.push import PushLinks, serve_push_stream
from volunteer.server.sessions import Session, SessionTable
from volunteer.server.slices import SliceBudget
from volunteer.server.step_batch import StepBatcher
from volunteer.server.training_calls import TrainingCalls
from volunteer.server.validation import ServerLimits
from volunteer.server.work_log import ServeStats
from volunteer.transport.commitment import PeerSigner
from volunteer.transport.protocol import (
    BACKWARD_HANDLE,
    FORWARD_HANDLE,
    INFERENCE_HANDLE,
    INFO_HANDLE,
    PUSH_HANDLE,
    BadRequestError,
    BusyError,
)
from volunteer.transport.upload_limit import UploadLimit

# hivemind's ServicerBase tells stream RPCs from unary ones by the `_name` of
# typing.AsyncIterator; collections.abc.AsyncIterator[...] lacks it and would silently
# register a stream handler as unary.
AsyncIterator = typing.AsyncIterator


class BlockHandler(TrainingCalls, ServicerBase):
    """Serves blocks [span.start, span.end) of one model to the swarm."""

    def __init__(
        self,
        *,
        span: BlockSpan,
        model_name: str,
        limits: ServerLimits,
        sessions: SessionTable,
        compute: PriorityCompute,
        throughput: float,
        caps: ServerCaps = DEFAULT_CAPS,
    ) -> None:
        self.span = span
        self.dtype = _weights_dtype(span)
        """The served weights' dtype (kept, not looked up: every request checks it)."""
        self.model_name = model_name
        self.limits = limits
        self.sessions = sessions
        self.compute = compute
        self.throughput = throughput
        self.stats = ServeStats()
        self.caps = caps
        self.session_slots = PeerSlots(
            "sessions", total=caps.max_sessions, per_peer=caps.max_sessions_per_peer
        )
        self.call_slots = PeerSlots(
            "forward/backward calls", total=caps.max_queued_jobs, per_peer=caps.max_calls_per_peer
        )
        self.push_slots = PeerSlots(
            "push streams", total=caps.max_sessions, per_peer=caps.max_push_streams_per_peer
        )
        self.refusals = Refusals(max_drop_bytes=caps.max_message_bytes)
        """Streams refused by any cap, lingering until their peers end them."""
        self.upload = UploadLimit()
        """The owner's upload cap over the replies and pushes sent through p2p."""
        self.push_penalties = PenaltyBox()
        """Peers whose pushes failed: refused new push streams for a growing while."""
        self.slice_budget = SliceBudget(caps.forward_slice_s)
        """How much of a forward/backward call one compute job takes (`slices`)."""
        self.batcher = StepBatcher(compute, lambda: self.caps.batch)
        """Runs the sessions' steps, batched (`volunteer.server.step_batch`)."""
        self.drill: Drill | None = None
        """Faults committed on purpose (`volunteer.server.drill`): drills only."""
        self.signer: PeerSigner | None = None  # commits to sessions' steps (None: no)
        self.is_paused = False
        """Paused by its volunteer: new sessions and forward/backward calls are turned
        away as busy (clients go elsewhere); open sessions finish."""
        self._p2p: P2P | None = None
        self.push_links: PushLinks | None = None
        """Links to the next servers of routes (None before `create` and after shutdown)."""

    @classmethod
    async def create(
        cls,
        *,
        p2p: P2P,
        span: BlockSpan,
        model_name: str,
        cache_tokens: int,
        max_batch: int = 8,
        max_chunk: int = 512,
        max_tokens: int | None = None,
        idle_timeout_s: float = 60.0,
        throughput: float = 0.0,
        threads: int | None = None,
        decode_threads: int | None = None,
        cpu_cap: float | None = None,
        upload_mbps: float | None = None,
        caps: ServerCaps = DEFAULT_CAPS,
    ) -> BlockHandler:
        """Builds a handler for `span` and registers its RPCs on `p2p`.

        Args:
            p2p: the running hivemind P2P to serve on.
            span: the loaded blocks; put in eval mode here.
            model_name: the swarm's name of the model, reported by `rpc_info`.
            cache_tokens: budget of cached positions over all sessions (sum of
                batch_size * max_length).
            max_batch, max_chunk, max_tokens: per-request limits (see `ServerLimits`);
                max_tokens defaults to max_batch * max_chunk.
            idle_timeout_s: how long a silent inference stream keeps its cache.
            throughput: tokens/s this server expects to sustain, reported by `rpc_info`.
            threads, decode_threads: torch threads of the compute thread, for all work
                and for one-position inference steps (see `PriorityCompute`).
            cpu_cap: the most cores the compute thread may keep busy (`max_cpu_percent`).
            upload_mbps: the most it may send through p2p (`max_upload_mbps`).
            caps: what peers may hold (see `ServerCaps`).
        """
        limits = ServerLimits(
            max_batch=max_batch,
            max_chunk=max_chunk,
            max_tokens=max_tokens or max_batch * max_chunk,
            max_length=span.config.max_position_embeddings,
            idle_timeout_s=idle_timeout_s,
        )
        handler = cls(
            span=span.eval(),
            model_name=model_name,
            limits=limits,
            sessions=SessionTable(cache_tokens=cache_tokens),
            compute=PriorityCompute(
                threads=threads, decode_threads=decode_threads, cpu_cap=cpu_cap
            ),
            throughput=throughput,
            caps=caps,
        )
        # Only info goes through hivemind's RPC machinery (a unary call: its size is
        # bounded by the p2p daemon); the streams are read by our bounded reader.
        await p2p.add_protobuf_handler(INFO_HANDLE, handler.rpc_info, runtime_pb2.ExpertUID)
        for handle, is_backward in ((FORWARD_HANDLE, False), (BACKWARD_HANDLE, True)):
            serve = functools.partial(serve_call, handler, is_backward=is_backward)
            await p2p.add_binary_stream_handler(handle, serve)
        await p2p.add_binary_stream_handler(INFERENCE_HANDLE, handler._serve_inference)
        await p2p.add_binary_stream_handler(PUSH_HANDLE, handler._serve_pushes)
        handler._p2p = p2p
        handler.upload.set_rate(upload_mbps)
        handler.push_links = PushLinks(
            p2p, PUSH_HANDLE, own_peer_id=p2p.peer_id.to_base58(), upload=handler.upload
        )
        return handler

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Unregisters the RPCs, cancels queued work and frees every session's cache."""
        if self.push_links is not None:
            links, self.push_links = self.push_links, None
            await asyncio.wait_for(links.close(), timeout_s)
        if self._p2p is not None and self._p2p.is_alive:
            p2p, self._p2p = self._p2p, None
            await asyncio.wait_for(self.remove_p2p_handlers(p2p), timeout_s)
            for handle in (INFERENCE_HANDLE, PUSH_HANDLE):
                await asyncio.wait_for(p2p.remove_binary_stream_handler(handle), timeout_s)
        self.compute.shutdown()
        self.sessions.release_all()

    async def open_local_stream(
        self, *, start: int, end: int, max_length: int, batch_size: int
    ) -> LocalInferenceStream:
        """An inference session on these blocks for a client in this process (libp2p
        cannot dial its own peer id): the same checks, cache budget and compute queue."""
        return await LocalInferenceStream.open(
            self, start=start, end=end, max_length=max_length, batch_size=batch_size
        )

    def swap_span(self, span: BlockSpan) -> BlockSpan:
        """Serves `span` from now on and returns the span served until now.

        Open sessions keep running on the blocks they were opened on; new requests must
        fall inside the new span. The old blocks are freed once nothing holds them.
        """
        if span.config != self.span.config or span.num_blocks != self.span.num_blocks:
            raise ValueError("a swapped-in span must be as long and of the same model")
        old, self.span = self.span, span.eval()
        self.dtype = _weights_dtype(span)
        return old

    async def rpc_info(
        self, request: runtime_pb2.ExpertUID, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Describes this server: span, model, dtype, limits, free cache."""
        reply = wire.InfoReply(
            model_name=self.model_name,
            start=self.span.start,
            end=self.span.end,
            hidden_size=self.span.config.hidden_size,
            dtype=str(self.dtype).removeprefix("torch."),
            cache_tokens_total=self.sessions.cache_tokens_total,
            cache_tokens_left=self.sessions.cache_tokens_left,
            max_batch=self.limits.max_batch,
            max_chunk=self.limits.max_chunk,
            max_tokens=self.limits.max_tokens,
            max_length=self.limits.max_length,
            throughput=self.throughput,
        )
        return runtime_pb2.ExpertResponse(metadata=wire.pack_metadata(reply))

    def _check_not_paused(self) -> None:
        if self.is_paused:
            raise BusyError("this server is paused by its volunteer; try another")

    def _drilled(self, key: object, output: torch.Tensor) -> torch.Tensor:
        """`output`, or what a drill answers instead (`volunteer.server.drill`)."""
        return output if self.drill is None else self.drill.output(key, output)

    async def open_session(self, meta: wire.OpenSessionRequest, *, peer: str) -> Session:
        """Checks and admits a session and allocates its cache (also for in-process use).

        Raises:
            BadRequestError: the span or a limit is wrong.
            BusyError: the cache budget has no room now, or the server is paused.
        """
        self._check_not_paused()
        validation.check_span(self.span, meta)
        validation.check_open(meta, self.limits)
        session = Session(
            peer=peer,
            session_id=meta.session_id,
            start=meta.start,
            end=meta.end,
            batch_size=meta.batch_size,
            max_length=meta.max_length,
            span=self.span,
            push_secret=meta.push_secret,
            expires_at=time.monotonic() + self.caps.max_session_s,
        )
        self.sessions.admit(session)
        try:
            session.cache = await self.compute.run(
                PRIORITY_INFERENCE, allocate_cache, session.span, session, peer=peer
            )
        except BaseException:
            self.end_session(session)
            raise
        return session

    def end_session(self, session: Session) -> None:
        """Frees the session's cache tokens (idempotent); batches wait no more for it."""
        self.sessions.release(session)
        self.batcher.forget(session.key)

    async def run_step(
        self, session: Session, hidden: torch.Tensor, start_pos: int
    ) -> torch.Tensor:
        """One inference step of an admitted session, after checking it fits the session.

        `hidden` must already have passed the per-request checks (`hidden_tensors` or
        `check_hidden`).
        """
        validation.check_step(session, hidden, start_pos)
        output = await self.batcher.step(session, hidden, start_pos)
        self.stats.count(hidden, session.peer, "inference", session.session_id)
        return self._drilled(session.key, output)

    def hidden_tensors(
        self, request: runtime_pb2.ExpertRequest, *, count: int, adapter_tensors: int = 0
    ) -> list[torch.Tensor]:
        """The request's tensors, each checked as hidden states within the limits."""
        return validation.hidden_tensors(
            request,
            count=count,
            hidden_size=self.span.config.hidden_size,
            limits=self.limits,
            dtype=self.dtype,
            adapter_tensors=adapter_tensors,
        )

    def check_hidden(self, hidden: torch.Tensor) -> None:
        """The per-request checks of `hidden_tensors`, for a tensor that came in-process."""
        validation.check_hidden(
            hidden, hidden_size=self.span.config.hidden_size, limits=self.limits, dtype=self.dtype
        )

    async def serve_inference_stream(
        self,
        peer: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upload: UploadLimit | None = None,
    ) -> None:
        """An inference stream from `peer` (over p2p or a local link), until it ends;
        refused as busy past the session caps. Its replies pay `upload` (p2p's)."""
        serve = functools.partial(serve_inference_stream, self, peer, reader, writer, upload=upload)
        await serve_in_slot(self.session_slots, self.refusals, peer, reader, writer, serve)

    async def serve_push_stream(
        self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A push link from another server (over p2p or a local link), until it ends;
        refused as busy past the push stream caps, and while its peer is kept out for
        failed pushes (then held unread: see `Refusals.hold_unread`)."""
        if (ban_s := self.push_penalties.banned_for(peer)) > 0:
            why = f"this peer's pushes failed; no push links from it for {ban_s:.0f} s"
            await self.refusals.hold_unread(writer, BadRequestError(why))
            return
        serve = functools.partial(serve_push_stream, self, peer, reader, writer)
        await serve_in_slot(self.push_slots, self.refusals, peer, reader, writer, serve)

    async def _serve_inference(
        self, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = str(stream_info.peer_id)
        await self.serve_inference_stream(peer, reader, writer, upload=self.upload)

    async def _serve_pushes(
        self, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self.serve_push_stream(str(stream_info.peer_id), reader, writer)


def _weights_dtype(span: BlockSpan) -> torch.dtype:
    return next(span.parameters()).dtype
