"""Local links: block servers' streams over Unix sockets, with real P2P daemons beside them.

Two servers (blocks 0:2 and 2:4 of one random model), each with its p2p handlers and a
`LocalListener` in a folder of its own, and a client P2P: sessions opened with a server's
socket must run there, give the blocks' outputs, push over the next server's socket, and
fall back to p2p whenever the socket is not the right peer's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hivemind.p2p import P2P
from volunteer.models.model import BlockSpan

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from tests.server import (
    WAIT_S,
    LoopThread,
    hidden_states,
    random_span,
    start_route_servers,
    step_until_pushed,
    sub_span,
    tiny_config,
)
from volunteer.client.remote_span import InferenceStream, RemoteSpan
from volunteer.server.handler import BlockHandler
from volunteer.transport.local_link import (
    FOLDER_PREFIX,
    SOCKET_NAME,
    LocalListener,
    dialable,
    open_local,
    remove_stale_folders,
    this_boot,
)
from volunteer.transport.protocol import INFERENCE_HANDLE, PUSH_HANDLE, PeerUnavailableError

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

MAX_LENGTH = 16
TIMEOUT_S = 10.0
ATOL = 1e-5


@dataclasses.dataclass
class Server:
    handler: BlockHandler
    p2p: P2P
    listener: LocalListener

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id.to_base58()

    @property
    def socket(self) -> str:
        assert self.listener.path is not None
        return str(self.listener.path)


@dataclasses.dataclass
class Pair:
    loop: LoopThread
    full: BlockSpan
    first: Server
    second: Server
    client: P2P

    def remote(self, server: Server, start: int, end: int, socket: str | None) -> RemoteSpan:
        return RemoteSpan(
            p2p=self.client, peer_id=server.p2p.peer_id, start=start, end=end, local_socket=socket
        )

    def open(self, server: Server, start: int, end: int, socket: str | None) -> InferenceStream:
        remote = self.remote(server, start, end, socket)
        return self.loop.run(remote.open_inference(max_length=MAX_LENGTH, batch_size=1))

    def local(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        with torch.no_grad():
            return sub_span(self.full, start, end)(hidden)


async def _start(full: BlockSpan, folder: Path) -> tuple[list[Server], P2P]:
    started, client = await start_route_servers(full, [(0, 2), (2, 4)])
    servers = []
    for index, (p2p, handler) in enumerate(started):
        handlers = {
            INFERENCE_HANDLE: handler.serve_inference_stream,
            PUSH_HANDLE: handler.serve_push_stream,
        }
        listener = LocalListener(p2p.peer_id.to_base58(), handlers)
        await listener.start(folder / f"server{index}")
        servers.append(Server(handler, p2p, listener))
    return servers, client


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    loop = LoopThread()
    full = random_span(tiny_config())
    # Short: a socket path must fit in 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="vll-", dir="/tmp"))
    try:
        (first, second), client = loop.run(_start(full, folder))
        yield Pair(loop, full, first, second, client)
        for server in (first, second):
            loop.run(server.listener.close())
            loop.run(server.handler.shutdown())
        for p2p in [client, first.p2p, second.p2p]:
            loop.run(p2p.shutdown())
    finally:
        loop.close()


def test_a_session_over_the_local_socket_runs_the_blocks(pair: Pair) -> None:
    served_before = pair.first.listener.links_served
    stream = pair.open(pair.first, 0, 2, pair.first.socket)
    assert pair.first.listener.links_served == served_before + 1
    hidden = hidden_states(1, 3, seed=5)
    output = pair.loop.run(stream.step(hidden, 0, TIMEOUT_S))
    assert torch.allclose(output, pair.local(hidden, 0, 2), atol=ATOL)
    pair.loop.run(stream.close())


def test_pushes_go_over_the_next_servers_local_socket(pair: Pair) -> None:
    first = pair.open(pair.first, 0, 2, pair.first.socket)
    second = pair.open(pair.second, 2, 4, pair.second.socket)
    assert second.push_target.local_socket == pair.second.socket
    links_before = pair.second.listener.links_served
    uploaded_before = pair.first.handler.upload.sent_bytes
    hidden = hidden_states(1, 2, seed=3)
    step_until_pushed(pair.loop, first, second, hidden)
    # The push link is the second server's newest local link: no p2p stream was needed.
    assert pair.second.listener.links_served == links_before + 1
    # Nothing is sent to the second server unless no answer comes within the grace time,
    # and then zeros, which give another output: this answer can only come from the push.
    waiting = second.step(torch.zeros(1, 2, 64), 0, WAIT_S, await_push_s=WAIT_S)
    answer = pair.loop.run(waiting, timeout_s=3 * WAIT_S)
    assert torch.allclose(answer, pair.local(hidden, 0, 4), atol=ATOL)
    # Replies and pushes within this machine are no upload: the owner's cap is not paid.
    assert pair.first.handler.upload.sent_bytes == uploaded_before
    for stream in (first, second):
        pair.loop.run(stream.close())


def test_another_peers_socket_is_refused_and_the_session_goes_through_p2p(pair: Pair) -> None:
    served_before = pair.second.listener.links_served
    # The first server's peer id with the second server's socket: a lying record.
    stream = pair.open(pair.first, 0, 2, pair.second.socket)
    assert pair.second.listener.links_served == served_before
    hidden = hidden_states(1, 2, seed=9)
    output = pair.loop.run(stream.step(hidden, 0, TIMEOUT_S))
    assert torch.allclose(output, pair.local(hidden, 0, 2), atol=ATOL)
    pair.loop.run(stream.close())


def test_a_gone_socket_falls_back_to_p2p(pair: Pair, tmp_path: Path) -> None:
    stream = pair.open(pair.first, 0, 2, str(tmp_path / SOCKET_NAME))
    hidden = hidden_states(1, 1, seed=2)
    assert torch.allclose(
        pair.loop.run(stream.step(hidden, 0, TIMEOUT_S)), pair.local(hidden, 0, 2), atol=ATOL
    )
    pair.loop.run(stream.close())


@pytest.mark.parametrize(
    "hello",
    [
        b"garbage that is no frame at all",
        framing.frame_bytes(b"\xc1 not msgpack"),
        framing.frame_bytes(
            wire.pack_metadata(wire.LocalHello(peer_id="x", handle=INFERENCE_HANDLE))
        ),
        framing.frame_bytes(b"", marker=P2P.ERROR_MARKER),
    ],
)
def test_a_bad_hello_is_refused_and_the_socket_serves_on(pair: Pair, hello: bytes) -> None:
    async def say(data: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(pair.first.socket)
        try:
            writer.write(data)
            return await asyncio.wait_for(reader.read(), TIMEOUT_S)
        finally:
            writer.close()

    assert pair.loop.run(say(hello)) == b""  # closed without a word
    stream = pair.open(pair.first, 0, 2, pair.first.socket)
    pair.loop.run(stream.close())


def test_an_unknown_stream_is_refused(pair: Pair) -> None:
    with pytest.raises(EOFError):
        pair.loop.run(open_local(pair.first.socket, pair.first.peer_id, "BlockHandler.rpc_forward"))


def test_the_socket_is_its_users_alone(pair: Pair) -> None:
    assert stat.S_IMODE(os.stat(pair.first.socket).st_mode) == 0o600


def test_only_our_socket_names_are_dialled(tmp_path: Path) -> None:
    accepted: list[bool] = []
    other = tmp_path / "other.sock"

    async def try_it() -> None:
        server = await asyncio.start_unix_server(lambda r, w: accepted.append(True), str(other))
        try:
            with pytest.raises(PeerUnavailableError, match="not a volunteer block server"):
                await open_local(str(other), "peer", INFERENCE_HANDLE)
            await asyncio.sleep(0.05)
        finally:
            server.close()

    loop = LoopThread()
    try:
        loop.run(try_it())
    finally:
        loop.close()
    assert accepted == []


def test_a_socket_is_dialable_only_from_its_own_boot() -> None:
    boot = this_boot()
    ours = f"/run/user/1000/volunteer/{SOCKET_NAME}"
    assert dialable(ours, None) is None
    assert dialable(ours, "another-boot") is None
    assert dialable(None, boot) is None
    assert dialable("/run/user/1000/volunteer/control.sock", boot) is None
    assert dialable(f"relative/{SOCKET_NAME}", boot) is None
    assert dialable(ours, boot) == (ours if boot is not None else None)


def test_closing_the_listener_ends_its_links_and_removes_the_socket(tmp_path: Path) -> None:
    ended = asyncio.Event()

    async def serve(peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            ended.set()

    async def scenario() -> bytes:
        listener = LocalListener("me", {"echo": serve})
        await listener.start(tmp_path)
        reader, writer = await open_local(str(tmp_path / SOCKET_NAME), "me", "echo")
        await listener.close()
        await asyncio.wait_for(ended.wait(), TIMEOUT_S)
        left = await asyncio.wait_for(reader.read(), TIMEOUT_S)
        writer.close()
        return left

    loop = LoopThread()
    try:
        assert loop.run(scenario()) == b""
    finally:
        loop.close()
    assert not (tmp_path / SOCKET_NAME).exists()


@pytest.mark.parametrize("deep", [True, False])
def test_a_private_folder_holds_the_socket_by_default_or_when_too_deep(
    tmp_path: Path, deep: bool
) -> None:
    folder = tmp_path / ("d" * 60) / ("e" * 60) if deep else None

    async def scenario() -> tuple[str, int]:
        listener = LocalListener("me", {})
        await listener.start(folder)
        assert listener.path is not None
        where = str(listener.path)
        mode = stat.S_IMODE(os.stat(listener.path.parent).st_mode)
        await listener.close()
        return where, mode

    loop = LoopThread()
    try:
        where, folder_mode = loop.run(scenario())
    finally:
        loop.close()
    assert where.endswith(SOCKET_NAME) and len(where) <= wire.MAX_SOCKET_PATH_CHARS
    assert Path(where).parent.parent == Path(tempfile.gettempdir())
    assert folder_mode == 0o700
    assert not Path(where).parent.exists()  # removed with the socket


def test_the_folders_of_dead_daemons_are_cleaned_up(tmp_path: Path) -> None:
    def folder(name: str) -> Path:
        made = tmp_path / f"{FOLDER_PREFIX}{name}"
        made.mkdir()
        return made

    dead = folder("dead")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(dead / SOCKET_NAME))  # bound, never listening: refuses, as a dead one
    alive = folder("alive")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(alive / SOCKET_NAME))
    listening.listen()
    old_empty, new_empty, other = folder("old"), folder("new"), folder("other")
    os.utime(old_empty, (time.time() - 2 * 3600,) * 2)
    (other / "notes.txt").write_text("not ours to judge")
    try:
        assert remove_stale_folders(tmp_path) == 2
    finally:
        listening.close()
    assert not dead.exists() and not old_empty.exists()
    assert alive.exists() and new_empty.exists() and other.exists()
