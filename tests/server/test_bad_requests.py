"""Bad requests get a clear error, and the server keeps serving; the cache budget holds."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator

import msgpack
import pytest
import torch
from hivemind.compression.serialization import serialize_torch_tensor
from hivemind.p2p import P2P, P2PHandlerError
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError
from volunteer.models.model import BlockSpan

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from tests.server import (
    LoopThread,
    hidden_states,
    random_span,
    sub_span,
    tiny_config,
    wait_until,
)
from volunteer.client.remote_span import RemoteSpan
from volunteer.server.handler import BlockHandler
from volunteer.transport.p2p_streams import open_stream
from volunteer.transport.protocol import (
    INFERENCE_HANDLE,
    BadRequestError,
    BusyError,
    PeerUnavailableError,
    RemoteError,
    RemoteSpanError,
    SessionExpiredError,
)

# hivemind's P2P.create finds its daemon binary with importlib.resources.path().
pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
START, END = 1, 3
CACHE_TOKENS = 64
IDLE_TIMEOUT_S = 5.0
LINGER_S = 2.0
"""How long a refused stream its peer holds open lingers (short, for the tests)."""
"""Long enough that no test's open session idles out between its calls on a loaded
machine; the expiry test waits it out once."""


@dataclasses.dataclass
class Server:
    loop: LoopThread
    local: BlockSpan
    server: P2P
    handler: BlockHandler
    client: P2P

    def remote(self, start: int = START, end: int = END) -> RemoteSpan:
        return RemoteSpan(p2p=self.client, peer_id=self.server.peer_id, start=start, end=end)

    def assert_still_serving(self) -> None:
        hidden = hidden_states(1, 3, seed=11)
        actual = self.loop.run(self.remote().forward(hidden, timeout_s=10))
        with torch.no_grad():
            assert torch.allclose(actual, self.local(hidden), atol=1e-5)

    def cache_tokens_left(self) -> int:
        return self.loop.run(self.remote().info(timeout_s=10)).cache_tokens_left


async def _start(span: BlockSpan) -> tuple[P2P, BlockHandler, P2P]:
    server = await P2P.create(host_maddrs=LOOPBACK)
    handler = await BlockHandler.create(
        p2p=server,
        span=span,
        model_name="tiny",
        cache_tokens=CACHE_TOKENS,
        max_batch=2,
        max_chunk=8,
        max_tokens=12,
        idle_timeout_s=IDLE_TIMEOUT_S,
    )
    maddrs = await server.get_visible_maddrs()
    client = await P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
    return server, handler, client


async def _stop(server: Server) -> None:
    await server.handler.shutdown()
    await server.client.shutdown()
    await server.server.shutdown()


@pytest.fixture(scope="module")
def served() -> Iterator[Server]:
    loop = LoopThread()
    full = random_span(tiny_config())
    try:
        p2p, handler, client = loop.run(_start(sub_span(full, START, END)))
        handler.refusals.linger_s = LINGER_S
        server = Server(loop, sub_span(full, START, END), p2p, handler, client)
        yield server
        loop.run(_stop(server))
    finally:
        loop.close()


def _request(
    meta: object = None, tensors: tuple[runtime_pb2.Tensor, ...] = ()
) -> runtime_pb2.ExpertRequest:
    """An envelope; `meta` is a schema, raw bytes, or any msgpack-able value."""
    if isinstance(meta, wire.SpanRequest | wire.StepRequest):
        raw = wire.pack_metadata(meta)
    elif isinstance(meta, bytes):
        raw = meta
    else:
        raw = msgpack.packb(meta)
    return runtime_pb2.ExpertRequest(metadata=raw, tensors=list(tensors))


def _span(start: int = START, end: int = END) -> wire.SpanRequest:
    return wire.SpanRequest(start=start, end=end)


def _tensor(
    batch: int = 1, seq: int = 2, hidden: int = 64, dtype: torch.dtype = torch.float32
) -> runtime_pb2.Tensor:
    return framing.pack_tensor(torch.ones(batch, seq, hidden, dtype=dtype))


def _open(
    max_length: int = 8, batch_size: int = 1, tensors: tuple[runtime_pb2.Tensor, ...] = ()
) -> runtime_pb2.ExpertRequest:
    meta = wire.OpenSessionRequest(
        start=START, end=END, session_id="s", max_length=max_length, batch_size=batch_size
    )
    return _request(meta, tensors)


def _step(
    start_pos: int = 0, batch: int = 1, seq: int = 2, session_id: str = "s"
) -> runtime_pb2.ExpertRequest:
    meta = wire.StepRequest(session_id=session_id, start_pos=start_pos)
    return _request(meta, (_tensor(batch, seq),))


def _close_message(session_id: str = "s") -> runtime_pb2.ExpertRequest:
    return _request(wire.StepRequest(session_id=session_id, is_close=True))


async def _raw(
    served: Server, method: str, messages: list[runtime_pb2.ExpertRequest]
) -> list[runtime_pb2.ExpertResponse]:
    """Sends hand-made messages straight through hivemind's stub; errors as ours."""
    stub = BlockHandler.get_stub(served.client, served.server.peer_id)

    async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        for message in messages:
            yield message

    async def call() -> list[runtime_pb2.ExpertResponse]:
        if method == "rpc_inference":
            replies = await _inference_stream(served, requests())
            return [reply async for reply in replies]
        return [await getattr(stub, method)(requests())]

    try:
        return await asyncio.wait_for(call(), 10)
    except P2PHandlerError as exc:
        raise wire.classify_remote_error(str(exc)) from exc


async def _inference_stream(
    served: Server, requests: AsyncIterator[runtime_pb2.ExpertRequest]
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """The inference stream through hivemind's generic stream caller: the server's plain
    stream handler must speak hivemind's framing."""
    return await served.client.iterate_protobuf_handler(
        served.server.peer_id, INFERENCE_HANDLE, requests, runtime_pb2.ExpertResponse
    )


FORWARD_CASES: dict[str, tuple[runtime_pb2.ExpertRequest, str]] = {
    "span outside": (_request(_span(0, 2), (_tensor(),)), "not inside the served span [1, 3)"),
    "empty span": (_request({"start": 2, "end": 2}, (_tensor(),)), "not inside the served"),
    "hidden size": (_request(_span(), (_tensor(hidden=32),)), "hidden size 32 != the model's 64"),
    "int64": (_request(_span(), (_tensor(dtype=torch.int64),)), "dtype 'int64' not accepted"),
    "float64": (_request(_span(), (_tensor(dtype=torch.float64),)), "dtype 'float64' not"),
    "float16": (_request(_span(), (_tensor(dtype=torch.float16),)), "send float32 or"),
    "huge B*S": (_request(_span(), (_tensor(2, 8),)), "B * S = 16 positions exceed the limit"),
    "long S": (_request(_span(), (_tensor(1, 9),)), "9 positions exceed max_chunk 8"),
    "rank": (
        _request(_span(), (framing.pack_tensor(torch.ones(2, 64)),)),
        "expected shape [B, S, H]",
    ),
    "lying header": (
        _request(
            _span(), (runtime_pb2.Tensor(size=[10**5, 10**4, 64], dtype="float32", buffer=b""),)
        ),
        "B * S = 1000000000 positions exceed",
    ),
    "garbage tensor": (
        _request(_span(), (runtime_pb2.Tensor(size=[1, 2, 64], dtype="float32", buffer=b"xx"),)),
        "buffer holds 2 bytes, its shape needs 512",
    ),
    "compressed": (
        _request(
            _span(),
            (serialize_torch_tensor(torch.ones(1, 2, 64), runtime_pb2.FLOAT16),),
        ),
        "only uncompressed tensors",
    ),
    "no tensors": (_request(_span()), "expected 1 tensor(s), got 0"),
    # A server signs what it computes: NaN in would be NaN out, and evidence against it.
    "NaN": (
        _request(_span(), (framing.pack_tensor(torch.full((1, 2, 64), float("nan"))),)),
        "hold NaN or infinite values",
    ),
    "inf": (
        _request(_span(), (framing.pack_tensor(torch.full((1, 2, 64), float("inf"))),)),
        "hold NaN or infinite values",
    ),
    "garbage metadata": (_request(b"\xc1\x00garbage", (_tensor(),)), "not valid msgpack"),
    "not a map": (_request([1, 2], (_tensor(),)), "metadata must be a map"),
    "wrong field type": (_request({"start": "one", "end": 3}, (_tensor(),)), "start"),
    "no metadata": (_request(b"", (_tensor(),)), "not valid msgpack"),
}


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_bad_forward_is_refused_and_the_server_carries_on(served: Server, case: str) -> None:
    request, reason = FORWARD_CASES[case]
    with pytest.raises(BadRequestError, match=r"^bad request: ") as caught:
        served.loop.run(_raw(served, "rpc_forward", [request]))
    assert reason in str(caught.value)
    served.assert_still_serving()


def test_backward_with_mismatched_gradient_is_refused(served: Server) -> None:
    request = _request(_span(), (_tensor(1, 2), _tensor(1, 3)))
    with pytest.raises(BadRequestError, match="grad_outputs shape"):
        served.loop.run(_raw(served, "rpc_backward", [request]))
    served.assert_still_serving()


INFERENCE_CASES: dict[str, tuple[list[runtime_pb2.ExpertRequest], str]] = {
    "beyond context": ([_open(max_length=129)], "max_length 129 exceeds the model's context"),
    "batch too big": ([_open(batch_size=3)], "batch_size 3 exceeds max_batch 2"),
    "wrong span": (
        [_request({"start": 0, "end": 3, "session_id": "s", "max_length": 8, "batch_size": 1})],
        "not inside the served span",
    ),
    "tensors in open": ([_open(tensors=(_tensor(),))], "carries no tensors"),
    "step before open": ([_step()], "the first message must open a session"),
    "unknown session": ([_open(), _step(session_id="other")], "unknown session id 'other'"),
    "skip ahead": ([_open(), _step(0), _step(5)], "start_pos 5 skips past the 2 cached"),
    "skip after rewind": (
        [_open(), _step(0, seq=4), _step(1, seq=1), _step(3)],
        "start_pos 3 skips past the 2 cached",
    ),
    "batch mismatch": ([_open(), _step(batch=2)], "batch 2 != the session's batch_size 1"),
    "past max_length": ([_open(max_length=4), _step(0), _step(2, seq=3)], "max_length 4"),
    "after close": ([_open(), _close_message(), _step()], "no messages may follow the close"),
    "garbage step": ([_open(), _request(b"\xc1")], "not valid msgpack"),
}


@pytest.mark.parametrize("case", sorted(INFERENCE_CASES))
def test_bad_inference_is_refused_and_the_server_carries_on(served: Server, case: str) -> None:
    messages, reason = INFERENCE_CASES[case]
    with pytest.raises(BadRequestError, match=r"^bad request: ") as caught:
        served.loop.run(_raw(served, "rpc_inference", messages))
    assert reason in str(caught.value)
    served.assert_still_serving()
    assert _wait_for_budget(served) == CACHE_TOKENS


def _frame(body: bytes, marker: bytes = P2P.MESSAGE_MARKER, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return marker + size.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body


RAW_INFERENCE_CASES: dict[str, tuple[bytes, str]] = {
    "unknown marker": (b"\x07" + bytes(16), "unknown marker b'\\x07'"),
    "huge length": (_frame(b"", length=1 << 40), "a message of 1099511627776 bytes exceeds"),
    "not protobuf": (_frame(b"\xff\xff\xff\xff"), "not a protobuf message"),
}


@pytest.mark.parametrize("case", sorted(RAW_INFERENCE_CASES))
def test_garbage_on_the_inference_stream_is_refused(served: Server, case: str) -> None:
    """Bytes that are not hivemind's framing of a request get an error frame naming the
    reason, then the stream ends (once its linger is over: this peer holds its side
    open, with garbage unread); the server serves on."""
    garbage, reason = RAW_INFERENCE_CASES[case]

    async def send_garbage() -> tuple[bytes, bytes]:
        peer = served.server.peer_id
        _, reader, writer = await open_stream(served.client, peer, INFERENCE_HANDLE)
        try:
            writer.write(framing.encode_frame(_open(max_length=8)) + garbage)
            marker, body = await asyncio.wait_for(framing.read_frame(reader, max_bytes=1 << 20), 10)
            assert marker == P2P.MESSAGE_MARKER  # the session opened
            marker, body = await asyncio.wait_for(framing.read_frame(reader, max_bytes=1 << 20), 10)
            with pytest.raises(asyncio.IncompleteReadError):  # the server ended the stream
                await asyncio.wait_for(reader.readexactly(1), LINGER_S + 10)
            return marker, body
        finally:
            writer.close()

    marker, body = served.loop.run(send_garbage())
    assert marker == P2P.ERROR_MARKER
    error = RPCError()
    error.ParseFromString(body)
    assert error.message.startswith("bad request: ")
    assert reason in error.message
    served.assert_still_serving()
    assert _wait_for_budget(served) == CACHE_TOKENS


def _wait_for_budget(served: Server) -> int:
    """Free cache tokens once every session is gone (or what is left if that never comes:
    the server ends a failed session as it fails, but the client may hear first)."""
    wait_until(lambda: served.cache_tokens_left() == CACHE_TOKENS)
    return served.cache_tokens_left()


def test_a_session_over_the_budget_is_busy(served: Server) -> None:
    with pytest.raises(BusyError, match=r"^busy: session needs 65 cache tokens"):
        served.loop.run(served.remote().open_inference(max_length=65, batch_size=1))
    served.assert_still_serving()


def test_closing_a_session_frees_its_budget(served: Server) -> None:
    remote = served.remote()
    first = served.loop.run(remote.open_inference(max_length=24, batch_size=2))
    assert served.cache_tokens_left() == CACHE_TOKENS - 48
    with pytest.raises(BusyError, match="16 of 64 free"):
        served.loop.run(remote.open_inference(max_length=32, batch_size=1))
    served.loop.run(first.close())
    assert _wait_for_budget(served) == CACHE_TOKENS
    second = served.loop.run(remote.open_inference(max_length=32, batch_size=1))
    served.loop.run(second.close())
    with pytest.raises(RemoteSpanError, match="closed") as caught:
        served.loop.run(second.step(hidden_states(1, 1), 0))
    assert not isinstance(caught.value, RemoteError | PeerUnavailableError)


def test_a_duplicate_session_id_is_refused(served: Server) -> None:
    remote = served.remote()
    stream = served.loop.run(remote.open_inference(max_length=8, batch_size=1, session_id="dup"))
    with pytest.raises(BadRequestError, match="session 'dup' is already open"):
        served.loop.run(remote.open_inference(max_length=8, batch_size=1, session_id="dup"))
    served.loop.run(stream.close())


def test_a_dropped_stream_frees_its_budget(served: Server) -> None:
    hang = asyncio.Event()

    async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
        yield _open(max_length=32)
        await hang.wait()  # never ends its side: the client just goes away

    async def open_and_drop() -> None:
        responses = await _inference_stream(served, requests())
        await asyncio.wait_for(anext(responses), 10)
        await responses.aclose()

    served.loop.run(open_and_drop())
    assert _wait_for_budget(served) == CACHE_TOKENS


def test_an_idle_session_expires(served: Server) -> None:
    began = time.monotonic()
    stream = served.loop.run(served.remote().open_inference(max_length=8, batch_size=1))
    # The server frees an idle session's cache when it ends it; not before its timeout.
    assert _wait_for_budget(served) == CACHE_TOKENS
    assert time.monotonic() - began >= IDLE_TIMEOUT_S
    with pytest.raises(SessionExpiredError, match=r"^expired: no message for 5 s"):
        served.loop.run(stream.step(hidden_states(1, 1), 0))


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Failed to call handler `X` at Qm: busy: no room", BusyError),
        ("BadRequestError('bad request: hidden size 3 != 64')", BadRequestError),
        ("Failed to call handler `X` at Qm: expired: no message", SessionExpiredError),
        ("RuntimeError('something else broke')", RemoteError),
    ],
)
def test_remote_error_text_maps_back_to_its_class(text: str, kind: type[RemoteError]) -> None:
    error = wire.classify_remote_error(text)
    assert type(error) is kind
    if kind is not RemoteError:
        assert str(error).startswith(kind.marker) and not str(error).endswith("')")


def test_a_peer_that_serves_nothing_is_unavailable(served: Server) -> None:
    # The client's own daemon has no block handlers registered.
    remote = RemoteSpan(p2p=served.server, peer_id=served.client.peer_id, start=START, end=END)
    with pytest.raises(PeerUnavailableError):
        served.loop.run(remote.info(timeout_s=5))
