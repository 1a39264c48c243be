"""The protocol's contract between client and server: the handle names the client calls
are the ones hivemind registers for the server, and a client uses no server that speaks
another protocol version."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import msgpack
import pytest
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

import tests.server  # noqa: F401  (imports hivemind with its import-time warning silenced)
import volunteer.transport.protocol as wire
from volunteer.client.remote_span import RemoteSpan, ping
from volunteer.client.replies import server_error
from volunteer.server.handler import BlockHandler
from volunteer.transport.protocol import (
    BACKWARD_HANDLE,
    FORWARD_HANDLE,
    INFERENCE_HANDLE,
    INFO_HANDLE,
    PROTOCOL_VERSION,
    IncompatiblePeerError,
    PeerUnavailableError,
)

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def test_handle_names_are_the_ones_hivemind_registers_for_the_server() -> None:
    BlockHandler._collect_rpc_handlers()
    registered = {
        rpc.method_name: BlockHandler._get_handle_name(None, rpc.method_name)
        for rpc in BlockHandler._rpc_handlers or []
    }
    assert registered == {
        "rpc_info": INFO_HANDLE,
        "rpc_forward": FORWARD_HANDLE,
        "rpc_backward": BACKWARD_HANDLE,
    }
    # Served as a plain stream, under the name hivemind would give a stream RPC, so that
    # hivemind's own stream callers reach it too.
    assert BlockHandler._get_handle_name(None, "rpc_inference") == INFERENCE_HANDLE


def _info(version: int | None) -> dict[str, object]:
    """An `InfoReply` as a server of protocol `version` sends it (None: no version)."""
    reply = wire.InfoReply(
        model_name="tiny",
        start=0,
        end=2,
        hidden_size=64,
        dtype="float32",
        cache_tokens_total=64,
        cache_tokens_left=64,
        max_batch=1,
        max_chunk=8,
        max_tokens=8,
        max_length=128,
        throughput=1.0,
    ).model_dump()
    if version is None:
        del reply["version"]
    else:
        reply["version"] = version
    return reply


async def _outcome(call: Awaitable[object]) -> object:
    """What the call returned, or the error it raised."""
    try:
        return await call
    except Exception as exc:
        return exc


async def _ask_a_server_that_answers(reply: dict[str, object]) -> tuple[object, object]:
    """Asks a server whose `rpc_info` answers `reply` through `RemoteSpan.info` and
    `ping`: what each returned or raised."""
    server = await P2P.create(host_maddrs=LOOPBACK)

    async def rpc_info(
        request: runtime_pb2.ExpertUID, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb(reply))

    await server.add_protobuf_handler(INFO_HANDLE, rpc_info, runtime_pb2.ExpertUID)
    client = await P2P.create(host_maddrs=LOOPBACK, initial_peers=await server.get_visible_maddrs())
    try:
        span = RemoteSpan(p2p=client, peer_id=server.peer_id, start=0, end=2)
        info = await _outcome(span.info(timeout_s=10))
        rtt = await _outcome(ping(client, server.peer_id, timeout_s=10))
        return info, rtt
    finally:
        await client.shutdown()
        await server.shutdown()


@pytest.mark.parametrize("version", [PROTOCOL_VERSION + 1, PROTOCOL_VERSION - 1, None])
def test_a_server_of_another_protocol_version_is_not_used(version: int | None) -> None:
    for error in asyncio.run(_ask_a_server_that_answers(_info(version))):
        assert isinstance(error, IncompatiblePeerError), error
        # Routing avoids such a server as it avoids one that is down.
        assert isinstance(error, PeerUnavailableError)
        expected = f"speaks protocol version {version}, this peer speaks {PROTOCOL_VERSION}"
        assert expected in str(error)


def test_a_server_of_our_protocol_version_is_used() -> None:
    info, rtt = asyncio.run(_ask_a_server_that_answers(_info(PROTOCOL_VERSION)))
    assert isinstance(info, wire.InfoReply) and info.version == PROTOCOL_VERSION
    assert isinstance(rtt, float) and rtt > 0


def test_printable_removes_what_could_drive_a_terminal() -> None:
    hostile = "ok\x1b[2J\x07 name\u202egnp.exe\u200b\r\nline\tend\x00"
    assert wire.printable(hostile) == "ok[2J namegnp.exe line end"
    assert wire.printable(hostile, keep_lines=True) == "ok[2J namegnp.exe\nline\tend"
    assert len(wire.printable("x" * 10_000, max_chars=50)) == 50


def test_a_servers_unexplained_error_reaches_the_user_without_control_characters() -> None:
    error = server_error("RuntimeError('\x1b]0;owned\x07boom')", what="server")
    assert isinstance(error, wire.BadReplyError)
    assert "\x1b" not in str(error) and "\x07" not in str(error)
    assert isinstance(server_error("busy: \x1b[31mfull", what="server"), wire.BusyError)
