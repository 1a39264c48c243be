"""The block server's RPC handlers on hivemind P2P: info, forward, backward, inference.

Wire shapes (envelopes and schemas are in `volunteer.transport.protocol`):

- `rpc_info`: unary; replies with `InfoReply` metadata.
- `rpc_forward` / `rpc_backward`: one `ExpertRequest` in (over a stream, so large
  tensors are not bound by the daemon's 4 MiB unary limit), one `ExpertResponse` out.
  Metadata `SpanRequest`; tensors: hidden [B, S, H] (backward: plus grad of outputs).
- `BlockHandler.push` (a plain stream, not an RPC): steps that the previous server of a
  route pushes to one of our sessions (see `volunteer.server.push`); never answered.
- `BlockHandler.rpc_inference`: a bidirectional stream in hivemind's framing, served
  as a plain stream (`_serve_inference`). The first message (`OpenSessionRequest`, no
  tensors) reserves a KV cache and is acknowledged; each later message (`StepRequest`
  plus hidden [B, S, H]) runs one step and gets the span's output; a message with
  `is_close`, the end of the stream, an error, or `idle_timeout_s` without a message
  ends the session and frees its cache.

Decisions:

- A request names blocks [start, end); they must lie inside the served span (a sub-span
  is allowed, so routes may use part of a server).
- Tensors arrive as float32 or the server's dtype; they are computed in the server's
  dtype and answered in the dtype they came in.
- B <= max_batch, S <= max_chunk and B * S <= max_tokens for every request; a session's
  max_length is at most the model's context.
- A step's start_pos may equal the cached length (the next step) or be below it (a
  rewind: the client replays from there, e.g. after failing over); never above it.
- Any bad request raises an error whose text names the reason; hivemind sends that text
  to the caller, and the server goes on serving everyone else. A failed inference step
  ends its session (the client replays into a fresh one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import typing

import torch
from google.protobuf.message import DecodeError
from hivemind.p2p import P2P, P2PContext, ServicerBase
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from volunteer.models.model import BlockSpan
from volunteer.server.local_stream import LocalInferenceStream
from volunteer.server.push import PushedStep, PushLinks, StepInbox
from volunteer.server.sessions import (
    PRIORITY_INFERENCE,
    PRIORITY_TRAINING,
    PriorityCompute,
    Session,
    SessionTable,
    allocate_cache,
    backward_span,
    forward_span,
    inference_step,
)
from volunteer.transport.protocol import (
    INFERENCE_HANDLE,
    PUSH_HANDLE,
    BadRequestError,
    BusyError,
    PeerUnavailableError,
    SessionExpiredError,
)

logger = logging.getLogger(__name__)

# hivemind's ServicerBase tells stream RPCs from unary ones by the `_name` of
# typing.AsyncIterator; collections.abc.AsyncIterator[...] lacks it and would silently
# register a stream handler as unary.
AsyncIterator = typing.AsyncIterator

MAX_PUSH_BYTES = 64 << 20
"""A pushed message is one step's hidden states: far below this."""
ERROR_WRITE_TIMEOUT_S = 1.0
"""How long a failed stream waits to hand its client the reason before it closes."""


@dataclasses.dataclass
class ServeStats:
    """What this server has done since it started (for `volunteer status` and the TUI)."""

    requests: int = 0
    """Requests answered: forward and backward calls, and inference steps."""
    tokens: int = 0
    """Positions run through the span (batch * sequence, summed over requests)."""
    pushed_steps: int = 0
    """Inference steps run from a push of the previous server, before the client sent them."""

    def count(self, hidden: torch.Tensor) -> None:
        self.requests += 1
        self.tokens += hidden.shape[0] * hidden.shape[1]


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of this server."""

    max_batch: int
    max_chunk: int
    """Most new positions per request (S)."""
    max_tokens: int
    """Most positions per request over the whole batch (B * S)."""
    max_length: int
    """The model's context: the longest session."""
    idle_timeout_s: float
    """A stream that sends nothing for this long is closed and its cache freed."""


class BlockHandler(ServicerBase):
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
        self.is_paused = False
        """Paused by its volunteer: new sessions and forward/backward calls are turned
        away as busy (clients go elsewhere); open sessions finish."""
        self._p2p: P2P | None = None
        self._links: PushLinks | None = None

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
            compute=PriorityCompute(threads=threads, decode_threads=decode_threads),
            throughput=throughput,
        )
        await handler.add_p2p_handlers(p2p)
        await p2p.add_binary_stream_handler(INFERENCE_HANDLE, handler._serve_inference)
        await p2p.add_binary_stream_handler(PUSH_HANDLE, handler._serve_pushes)
        handler._p2p = p2p
        handler._links = PushLinks(p2p, PUSH_HANDLE, own_peer_id=p2p.peer_id.to_base58())
        return handler

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        """Unregisters the RPCs, cancels queued work and frees every session's cache."""
        if self._links is not None:
            links, self._links = self._links, None
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

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Hidden states [B, S, H] through blocks [start, end), no cache."""
        request = await self._only_request(requests)
        meta = self._check_span(wire.unpack_metadata(request.metadata, wire.SpanRequest))
        (hidden,) = self._hidden_tensors(request, count=1)
        output = await self._forward(hidden, meta.start, meta.end)
        return runtime_pb2.ExpertResponse(tensors=[framing.pack_tensor(output)])

    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Given inputs [B, S, H] and the grad of the outputs, the grad of the inputs."""
        request = await self._only_request(requests)
        meta = self._check_span(wire.unpack_metadata(request.metadata, wire.SpanRequest))
        hidden, grad_outputs = self._hidden_tensors(request, count=2)
        grad = await self._backward(hidden, grad_outputs, meta.start, meta.end)
        return runtime_pb2.ExpertResponse(tensors=[framing.pack_tensor(grad)])

    async def run_forward(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """`rpc_forward` for a tensor that came in-process (this peer's own client)."""
        self._check_span(wire.SpanRequest(start=start, end=end))
        self.check_hidden(hidden)
        return await self._forward(hidden, start, end)

    async def run_backward(
        self, hidden: torch.Tensor, grad_outputs: torch.Tensor, start: int, end: int
    ) -> torch.Tensor:
        """`rpc_backward` for tensors that came in-process (this peer's own client)."""
        self._check_span(wire.SpanRequest(start=start, end=end))
        self.check_hidden(hidden)
        self.check_hidden(grad_outputs)
        return await self._backward(hidden, grad_outputs, start, end)

    def _check_not_paused(self) -> None:
        if self.is_paused:
            raise BusyError("this server is paused by its volunteer; try another")

    async def _forward(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        self._check_not_paused()
        output = await self.compute.run(
            PRIORITY_TRAINING, forward_span, self.span, hidden, start, end
        )
        self.stats.count(hidden)
        return output

    async def _backward(
        self, hidden: torch.Tensor, grad_outputs: torch.Tensor, start: int, end: int
    ) -> torch.Tensor:
        self._check_not_paused()
        if hidden.shape != grad_outputs.shape:
            raise BadRequestError(
                f"grad_outputs shape {list(grad_outputs.shape)} != "
                f"hidden shape {list(hidden.shape)}"
            )
        grad = await self.compute.run(
            PRIORITY_TRAINING, backward_span, self.span, hidden, grad_outputs, start, end
        )
        self.stats.count(hidden)
        return grad

    async def _serve_inference(
        self, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self.serve_inference_stream(str(stream_info.peer_id), reader, writer)

    async def serve_inference_stream(
        self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """An inference stream from `peer` (over p2p, or a local link: see
        `volunteer.transport.local_link`), until it ends.

        Read and answered here rather than through hivemind's stream RPC machinery: that
        took a new task, a wait and two queue hand-offs per message, ~0.3 ms per step
        here with the caches cold after the compute. The framing is hivemind's; an error
        ends the stream with an error frame as hivemind's handlers do, whose text names
        the reason.
        """
        messages = _client_messages(reader, max_bytes=self._max_step_bytes())
        replies = self.inference_session(messages, peer=peer)
        with contextlib.closing(writer):
            try:
                async for reply in replies:
                    writer.write(framing.encode_frame(reply))
                    await framing.drain_if_full(writer, self.limits.idle_timeout_s)
            except (OSError, asyncio.TimeoutError):
                return  # the client went away or stopped reading: nobody to tell
            except Exception as exc:
                level = logging.DEBUG if isinstance(exc, wire.RemoteSpanError) else logging.WARNING
                logger.log(level, "inference stream of %s failed: %s", peer, exc)
                with contextlib.suppress(Exception):
                    writer.write(framing.encode_frame(RPCError(message=str(exc))))
                    await asyncio.wait_for(writer.drain(), ERROR_WRITE_TIMEOUT_S)
            finally:
                await replies.aclose()

    def _max_step_bytes(self) -> int:
        """The largest message a valid step can be: a float32 tensor of max_tokens
        positions and its metadata."""
        return self.limits.max_tokens * self.span.config.hidden_size * 4 + wire.MAX_METADATA_BYTES

    async def inference_session(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], *, peer: str
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """An inference session: open, then one reply per step, until close.

        Steps come from the client's stream and, pushed by the previous server of the
        route, from `_serve_pushes`; whichever copy of a step comes first is run and
        answered, the other is dropped.
        """
        session = await self._open_session(await self._first_request(requests), peer=peer)
        log_context = f"peer {peer}, session {session.session_id!r}"
        logger.debug("opened inference session (%s)", log_context)
        inbox = StepInbox(requests, idle_timeout_s=self.limits.idle_timeout_s)
        session.inbox = inbox
        try:
            yield self._step_reply(session)
            while (item := await inbox.next()) is not None:
                if isinstance(item, PushedStep):
                    meta, hidden = item.meta, item.hidden
                elif (step := await self._client_step(session, inbox, item)) is None:
                    return  # closed
                else:
                    meta, hidden = step
                if 0 < meta.step_id <= session.last_step_id:
                    continue  # the other copy of this step was run and answered
                # Built before the compute, which leaves every cache cold.
                push = self._push_metadata(meta) if meta.push_to else None
                try:
                    output = await self.run_step(session, hidden, meta.start_pos)
                except BadRequestError as exc:
                    if not isinstance(item, PushedStep):
                        raise
                    # A push is a shortcut: the client's own copy of the step still comes.
                    logger.debug("dropped a pushed step (%s): %s", log_context, exc)
                    continue
                packed = framing.pack_tensor(output)
                session.last_step_id = max(session.last_step_id, meta.step_id)
                if isinstance(item, PushedStep):
                    self.stats.pushed_steps += 1
                pushed = push is not None and self._push(*push, packed)
                yield self._step_reply(session, packed, pushed=pushed)
        finally:
            # However the stream ends (close, error, timeout, cancellation), free the cache.
            session.inbox = None
            inbox.close()
            self.sessions.release(session)
            logger.debug("closed inference session (%s)", log_context)

    async def _client_step(
        self, session: Session, inbox: StepInbox, request: runtime_pb2.ExpertRequest
    ) -> tuple[wire.StepRequest, torch.Tensor] | None:
        """A message of the client's stream as a step; None when it closes the session
        (and the stream then ended, as it must)."""
        meta = wire.unpack_metadata(request.metadata, wire.StepRequest)
        if meta.session_id != session.session_id:
            raise BadRequestError(
                f"unknown session id {meta.session_id!r} (this stream is {session.session_id!r})"
            )
        if meta.is_close:
            if await inbox.next_from_client() is not None:
                raise BadRequestError("unexpected message: no messages may follow the close")
            return None
        (hidden,) = self._hidden_tensors(request, count=1)
        return meta, hidden

    def _push_metadata(self, meta: wire.StepRequest) -> tuple[wire.NextHop, bytes] | None:
        """Where a step's output is to be pushed (see `volunteer.server.push`) and the
        metadata it goes with; None when this server pushes nothing."""
        if self._links is None:
            return None
        target, rest = meta.push_to[0], meta.push_to[1:]
        # Built from checked values: constructed without validating them again.
        pushed = wire.StepRequest.model_construct(
            session_id=target.session_id,
            start_pos=meta.start_pos,
            step_id=meta.step_id,
            push_to=rest,
        )
        return target, wire.pack_metadata(pushed)

    def _push(self, target: wire.NextHop, metadata: bytes, output: runtime_pb2.Tensor) -> bool:
        """Sends a step's output on to the next server; False when there is no open
        link to it (yet)."""
        if self._links is None:
            return False
        request = runtime_pb2.ExpertRequest(tensors=[output], metadata=metadata)
        return self._links.send(target, request)

    async def _serve_pushes(
        self, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self.serve_push_stream(str(stream_info.peer_id), reader, writer)

    async def serve_push_stream(
        self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A link from another server: each message is a step for one of our sessions.

        Nothing is ever answered: a push that does not parse, names no open session, or
        does not fit it is dropped (its client sends the step itself too). A link that
        breaks the framing, or stays silent past the idle timeout, is closed.
        """
        with contextlib.closing(writer):
            while True:
                try:
                    marker, body = await asyncio.wait_for(
                        framing.read_frame(reader, max_bytes=MAX_PUSH_BYTES),
                        self.limits.idle_timeout_s,
                    )
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, PeerUnavailableError):
                    return  # silent too long, ended, or not our framing
                except OSError:  # the connection broke
                    return
                if marker != P2P.MESSAGE_MARKER:
                    return
                try:
                    self._take_push(body)
                except BadRequestError as exc:
                    logger.debug("dropped a push from %s: %s", peer, exc)

    def _take_push(self, body: bytes) -> None:
        request = runtime_pb2.ExpertRequest()
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise BadRequestError(f"not a protobuf message ({exc})") from exc
        meta = wire.unpack_metadata(request.metadata, wire.StepRequest)
        if meta.is_close or meta.step_id == 0:
            raise BadRequestError("a push carries a numbered step")
        session = self.sessions.find_for_push(meta.session_id)
        if session is None or session.inbox is None:
            raise BadRequestError(f"no session {meta.session_id!r} takes pushes")
        if meta.step_id <= session.last_step_id:
            return  # late: the client's copy was run already
        (hidden,) = self._hidden_tensors(request, count=1)
        if not session.inbox.push(PushedStep(meta, hidden)):
            raise BadRequestError(f"session {meta.session_id!r} has a full inbox")

    async def _first_request(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest]
    ) -> runtime_pb2.ExpertRequest:
        request = await self._next_request(requests)
        if request is None:
            raise BadRequestError("the request stream ended before its first message")
        return request

    async def _only_request(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest]
    ) -> runtime_pb2.ExpertRequest:
        request = await self._first_request(requests)
        await self._expect_end(requests, "a forward/backward stream carries one message")
        return request

    async def _expect_end(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], reason: str
    ) -> None:
        """Waits for the caller to end its side of the stream.

        Replying (or ending our side) before that would cut the connection under the
        caller's last write, which it would see as a broken pipe instead of our answer.
        """
        if await self._next_request(requests) is not None:
            raise BadRequestError(f"unexpected message: {reason}")

    async def _next_request(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest]
    ) -> runtime_pb2.ExpertRequest | None:
        """The next message, or None at the end of the stream."""
        timeout_s = self.limits.idle_timeout_s
        try:
            return await asyncio.wait_for(anext(requests), timeout_s)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise SessionExpiredError(f"no message for {timeout_s:g} s; stream closed") from None

    async def _open_session(self, request: runtime_pb2.ExpertRequest, *, peer: str) -> Session:
        try:
            meta = wire.unpack_metadata(request.metadata, wire.OpenSessionRequest)
        except BadRequestError as exc:
            reason = str(exc).removeprefix(BadRequestError.marker)
            raise BadRequestError(f"the first message must open a session: {reason}") from exc
        if request.tensors:
            raise BadRequestError("the opening message carries no tensors")
        return await self.open_session(meta, peer=peer)

    async def open_session(self, meta: wire.OpenSessionRequest, *, peer: str) -> Session:
        """Checks and admits a session and allocates its cache (also for in-process use).

        Raises:
            BadRequestError: the span or a limit is wrong.
            BusyError: the cache budget has no room now, or the server is paused.
        """
        self._check_not_paused()
        self._check_span(meta)
        if meta.batch_size > self.limits.max_batch:
            raise BadRequestError(
                f"batch_size {meta.batch_size} exceeds max_batch {self.limits.max_batch}"
            )
        if meta.max_length > self.limits.max_length:
            raise BadRequestError(
                f"max_length {meta.max_length} exceeds the model's context "
                f"of {self.limits.max_length}"
            )
        session = Session(
            peer=peer,
            session_id=meta.session_id,
            start=meta.start,
            end=meta.end,
            batch_size=meta.batch_size,
            max_length=meta.max_length,
            span=self.span,
        )
        self.sessions.admit(session)
        try:
            session.cache = await self.compute.run(
                PRIORITY_INFERENCE, allocate_cache, session.span, session
            )
        except BaseException:
            self.sessions.release(session)
            raise
        return session

    def _step_reply(
        self, session: Session, output: runtime_pb2.Tensor | None = None, *, pushed: bool = False
    ) -> runtime_pb2.ExpertResponse:
        length = session.cache.length if session.cache is not None else 0
        # Our own values: constructed without validating them.
        meta = wire.StepReply.model_construct(
            session_id=session.session_id, length=length, pushed=pushed
        )
        tensors = [] if output is None else [output]
        return runtime_pb2.ExpertResponse(tensors=tensors, metadata=wire.pack_metadata(meta))

    def _check_span(self, meta: wire.SpanRequest) -> wire.SpanRequest:
        span = self.span
        if not span.start <= meta.start < meta.end <= span.end:
            raise BadRequestError(
                f"blocks [{meta.start}, {meta.end}) are not inside the served span "
                f"[{span.start}, {span.end})"
            )
        return meta

    def _hidden_tensors(
        self, request: runtime_pb2.ExpertRequest, *, count: int
    ) -> list[torch.Tensor]:
        """The request's tensors, each checked as hidden states within the limits."""
        if len(request.tensors) != count:
            raise BadRequestError(f"expected {count} tensor(s), got {len(request.tensors)}")
        limits = self.limits
        tensors = []
        for index, proto in enumerate(request.tensors):
            tensor = framing.unpack_hidden(
                proto,
                hidden_size=self.span.config.hidden_size,
                max_positions=limits.max_tokens,
                name=f"tensor {index}",
            )
            self._check_limits(tensor, limits)
            tensors.append(tensor)
        return tensors

    def _check_limits(self, tensor: torch.Tensor, limits: ServerLimits) -> None:
        batch, seq, _ = tensor.shape
        if batch > limits.max_batch:
            raise BadRequestError(f"batch {batch} exceeds max_batch {limits.max_batch}")
        if seq > limits.max_chunk:
            raise BadRequestError(f"{seq} positions exceed max_chunk {limits.max_chunk}")
        if batch * seq > limits.max_tokens:
            raise BadRequestError(f"{batch * seq} positions exceed max_tokens {limits.max_tokens}")
        if tensor.dtype not in (torch.float32, self.dtype):
            raise BadRequestError(
                f"dtype {tensor.dtype} not accepted: send float32 or {self.dtype}"
            )

    async def run_step(
        self, session: Session, hidden: torch.Tensor, start_pos: int
    ) -> torch.Tensor:
        """One inference step of an admitted session, after checking it fits the session.

        `hidden` must already have passed the per-request checks (`_hidden_tensors`).
        """
        self._check_step(session, hidden, start_pos)
        batch, seq, _ = hidden.shape
        output = await self.compute.run(
            PRIORITY_INFERENCE, inference_step, session, hidden, start_pos, decode=batch * seq == 1
        )
        self.stats.count(hidden)
        return output

    def check_hidden(self, hidden: torch.Tensor) -> None:
        """The per-request checks of `_hidden_tensors`, for a tensor that came in-process."""
        limits = self.limits
        if hidden.dim() != 3 or hidden.shape[2] != self.span.config.hidden_size:
            raise BadRequestError(
                f"hidden states must be [batch, seq, {self.span.config.hidden_size}], "
                f"got {list(hidden.shape)}"
            )
        self._check_limits(hidden, limits)

    def _check_step(self, session: Session, hidden: torch.Tensor, start_pos: int) -> None:
        batch, seq, _ = hidden.shape
        if batch != session.batch_size:
            raise BadRequestError(f"batch {batch} != the session's batch_size {session.batch_size}")
        assert session.cache is not None  # admitted sessions always hold a cache
        if start_pos > session.cache.length:
            raise BadRequestError(
                f"start_pos {start_pos} skips past the {session.cache.length} cached positions"
            )
        if start_pos + seq > session.max_length:
            raise BadRequestError(
                f"start_pos {start_pos} + {seq} positions exceed the session's "
                f"max_length {session.max_length}"
            )


def _weights_dtype(span: BlockSpan) -> torch.dtype:
    return next(span.parameters()).dtype


async def _client_messages(
    reader: asyncio.StreamReader, *, max_bytes: int
) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    """The messages of a client's stream, until it ends its side (hivemind's end-of-stream
    frame) or the connection closes.

    Raises:
        BadRequestError: a frame that is not hivemind's, one over max_bytes, or a body
            that is not an `ExpertRequest`.
    """
    while True:
        try:
            marker, body = await framing.read_frame(reader, max_bytes=max_bytes)
        except asyncio.IncompleteReadError:
            return
        except PeerUnavailableError as exc:
            raise BadRequestError(str(exc)) from exc
        if marker == P2P.ERROR_MARKER:
            return
        request = runtime_pb2.ExpertRequest()
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise BadRequestError(f"not a protobuf message ({exc})") from exc
        yield request
