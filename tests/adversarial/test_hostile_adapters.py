"""Hostile peers around adapted forward/backward calls, on 127.0.0.1.

A hostile fine-tuning client against a real block server: adapter metadata and tensors
that lie (unknown targets, a rank past the bound, tensors missing or of the wrong shape,
NaN, a header that claims more than it carries, a size over the server's cap) are each
refused with a reason before any compute, and the server goes on answering an honest
adapted call. A hostile server (a bare hivemind peer) against our client: a reply that
does not say it applied the adapter, or whose adapter gradients are missing, misshapen or
NaN, is a bad reply, never a gradient."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import msgpack
import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from volunteer.models.adapters import AdapterLayout, SpanAdapter

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from tests.server import LoopThread, hidden_states, random_span, sub_span, tiny_config
from volunteer.client.calls import call_once, within
from volunteer.client.remote_span import RemoteSpan
from volunteer.server.handler import BlockHandler
from volunteer.transport.protocol import (
    BACKWARD_HANDLE,
    FORWARD_HANDLE,
    BadReplyError,
    BadRequestError,
)

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
LORA = AdapterLayout(rank=2, targets=("qkv", "down"), scale=2.0)


@dataclasses.dataclass
class Server:
    loop: LoopThread
    p2p: P2P
    handler: BlockHandler
    attacker: P2P


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    loop = LoopThread()
    full = random_span(tiny_config())

    async def start() -> Server:
        p2p = await P2P.create(host_maddrs=LOOPBACK)
        handler = await BlockHandler.create(
            p2p=p2p, span=sub_span(full, 0, 2), model_name="tiny", cache_tokens=256
        )
        maddrs = await p2p.get_visible_maddrs()
        attacker = await P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
        return Server(loop, p2p, handler, attacker)

    try:
        found = loop.run(start(), timeout_s=60)
        yield found
        loop.run(found.handler.shutdown())
        loop.run(found.attacker.shutdown())
        loop.run(found.p2p.shutdown())
    finally:
        loop.close()


def _tensors(layout: AdapterLayout, blocks: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    shapes = layout.shapes(tiny_config(), blocks)
    return [torch.randn(shape, generator=generator) * 0.1 for shape in shapes]


def _send(
    server: Server,
    adapter: dict | None,
    tensors: list[runtime_pb2.Tensor],
    handle: str = FORWARD_HANDLE,
) -> runtime_pb2.ExpertResponse:
    meta = {"start": 0, "end": 2, "adapter": adapter}
    request = runtime_pb2.ExpertRequest(tensors=tensors, metadata=msgpack.packb(meta))
    call = call_once(
        server.attacker,
        server.p2p.peer_id,
        handle,
        request,
        max_reply_bytes=1 << 24,
        timeout_s=30,
        what="the server",
    )
    return server.loop.run(within(call, timeout_s=30, what="the server"), timeout_s=60)


def _packed(*tensors: torch.Tensor) -> list[runtime_pb2.Tensor]:
    return [framing.pack_tensor(t) for t in tensors]


SPEC = {"rank": 2, "targets": ["qkv", "down"], "scale": 2.0}


def _lying_header() -> runtime_pb2.Tensor:
    proto = framing.pack_tensor(torch.zeros(2, 2, 64))
    del proto.size[:]
    proto.size.extend([2, 2, 1 << 30])  # claims 16 GiB, carries 1 KiB
    return proto


CASES = {
    "unknown target": ({**SPEC, "targets": ["qkv", "everything"]}, None, "LoRA targets"),
    "rank past the bound": ({**SPEC, "rank": 100_000}, None, "rank"),
    "a tensor missing": (SPEC, lambda ts: ts[:-1], r"expected (5|6) tensor\(s\), got (4|5)"),
    "a wrong shape": (
        SPEC,
        lambda ts: [ts[0][:1], *ts[1:]],
        r"adapter tensor 0 is \[1, 2, 64\], not \[2, 2, 64\]",
    ),
    "NaN": (
        SPEC,
        lambda ts: [ts[0].fill_(float("nan")), *ts[1:]],
        "holds NaN or infinite values",
    ),
    "a lying header": (SPEC, "lying", "adapter tensor 0"),
    "deep prompts past the bound": ({"prompt_len": 10**6}, None, "prompt_len"),
}


@pytest.mark.parametrize("case", CASES, ids=CASES.keys())
def test_a_lying_adapter_is_refused_with_a_reason(server: Server, case: str) -> None:
    spec, mangle, reason = CASES[case]
    tensors = _tensors(LORA)
    hidden = hidden_states(1, 3)
    if mangle == "lying":
        protos = [framing.pack_tensor(hidden), _lying_header(), *_packed(*tensors[1:])]
    else:
        protos = _packed(hidden, *(mangle(tensors) if mangle else tensors))
    before = server.handler.compute.jobs_run
    for handle, extra in ((FORWARD_HANDLE, []), (BACKWARD_HANDLE, [framing.pack_tensor(hidden)])):
        with pytest.raises(BadRequestError, match=reason):
            _send(server, spec, [protos[0], *extra, *protos[1:]], handle)
    assert server.handler.compute.jobs_run == before  # refused before any compute


def test_an_adapter_over_the_cap_is_refused_unread_and_an_honest_one_is_served(
    server: Server,
) -> None:
    handler = server.handler
    caps = handler.caps
    before = handler.compute.jobs_run
    handler.caps = dataclasses.replace(caps, max_adapter_bytes=1024)
    try:
        hidden = hidden_states(1, 3)
        with pytest.raises(BadRequestError, match="exceeds this server's cap of 1 KiB"):
            _send(server, SPEC, _packed(hidden, *_tensors(LORA)))
    finally:
        handler.caps = caps
    assert handler.compute.jobs_run == before  # nothing computed for the refused calls
    adapter = SpanAdapter.of(LORA, _tensors(LORA), tiny_config())
    remote = RemoteSpan(p2p=server.attacker, peer_id=server.p2p.peer_id, start=0, end=2)
    output = server.loop.run(remote.forward(hidden, timeout_s=30, adapter=adapter))
    plain = server.loop.run(remote.forward(hidden, timeout_s=30))
    assert output.shape == hidden.shape and not torch.allclose(output, plain)


REPLIES = {
    # What a hostile (or an older) server answers an adapted backward with.
    "no word that it applied the adapter": ("unadapted", "did not apply the call's adapter"),
    "an adapter gradient missing": ("missing", "answered 4 tensors for a backward that needs 5"),
    "an adapter gradient of the wrong shape": ("shape", "an adapter gradient \\[1, 2, 64\\]"),
    "NaN in an adapter gradient": ("nan", "NaN or infinite values"),
}


async def _start_hostile(server: Server, mode: list[str]) -> P2P:
    # The hostile dials the attacker itself: the attacker then reaches it over that
    # connection, not by a routing lookup through the server that may not have settled.
    maddrs = await server.p2p.get_visible_maddrs() + await server.attacker.get_visible_maddrs()
    hostile = await P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs)

    async def backward(_: object, reader, writer) -> None:
        try:
            _, body = await framing.read_frame(reader, max_bytes=1 << 24)
            request = runtime_pb2.ExpertRequest()
            request.ParseFromString(body)
            hidden = framing.unpack_tensor(request.tensors[0], max_numel=1 << 20)
            grads = [
                framing.unpack_tensor(proto, max_numel=1 << 20) for proto in request.tensors[2:]
            ]
            if mode[0] == "missing":
                grads = grads[:-1]
            elif mode[0] == "shape":
                grads[0] = grads[0][:1]
            elif mode[0] == "nan":
                grads[1] = torch.full_like(grads[1], float("nan"))
            adapted = wire.CallReply(adapted=mode[0] != "unadapted")
            reply = runtime_pb2.ExpertResponse(
                tensors=_packed(hidden, *grads), metadata=wire.pack_metadata(adapted)
            )
            writer.write(framing.encode_frame(reply))
            await writer.drain()
            await asyncio.sleep(0.2)
        finally:
            writer.close()

    await hostile.add_binary_stream_handler(BACKWARD_HANDLE, backward)
    return hostile


@pytest.mark.parametrize("reply", REPLIES, ids=REPLIES.keys())
def test_a_lying_adapted_reply_is_a_bad_reply(server: Server, reply: str) -> None:
    mode, reason = REPLIES[reply]
    modes = [mode]
    hostile = server.loop.run(_start_hostile(server, modes), timeout_s=60)
    try:
        adapter = SpanAdapter.of(LORA, _tensors(LORA), tiny_config())
        remote = RemoteSpan(p2p=server.attacker, peer_id=hostile.peer_id, start=0, end=2)
        hidden = hidden_states(1, 3)
        with pytest.raises(BadReplyError, match=reason):
            server.loop.run(
                remote.backward(hidden, hidden, timeout_s=30, adapter=adapter), timeout_s=60
            )
    finally:
        server.loop.run(hostile.shutdown())
