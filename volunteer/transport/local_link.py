"""A shortcut between swarm processes of one machine: a block server's streams over a
Unix socket.

Several daemons may share a machine (one per GPU, or a `--home` each), and a client often
runs next to them. Through the p2p daemons, every message between two such processes
crosses two more processes (each side's p2pd), for each hop of every token, with the
caches cold after a step's compute. So a block server also listens on a
Unix socket (mode 0600, in a private temp folder) and announces its path with this
boot's id; a process that sees its own boot id there opens the inference stream
and the push links on that socket instead, in the same framing, and goes through p2p
whenever that fails.

A link opens with a `LocalHello` each way: the caller names the peer id it means to reach
and the stream it wants; the server answers only when the peer id is its own, else it
closes. So a record that names another daemon's socket reaches nobody by mistake, and
only sockets with our own file name are ever dialled: a record cannot make a process
connect to some other local service.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from hivemind.p2p import P2P

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from volunteer.transport.protocol import LocalHello, PeerUnavailableError, RemoteSpanError

logger = logging.getLogger(__name__)

SOCKET_NAME = "blocks.sock"
FOLDER_PREFIX = "volunteer-links-"
"""The private folders of the sockets, in the temp folder."""
STALE_EMPTY_S = 3600.0
HELLO_TIMEOUT_S = 2.0
"""How long either side waits for the other's hello: both are on this machine."""
MAX_HELLO_BYTES = 1024

StreamHandler = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""(peer label, reader, writer): serves one stream until it ends."""

LINK_ERRORS = (OSError, EOFError, asyncio.TimeoutError, RemoteSpanError)
"""What a failed local link raises: the caller then goes through p2p."""


@functools.cache
def this_boot() -> str | None:
    """This machine's boot id (Linux): processes that read the same one share a kernel,
    so a socket path one of them announces may be reachable by the others. None
    elsewhere: no local links there."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    return boot or None


def dialable(path: str | None, boot: str | None) -> str | None:
    """`path` when a process of this boot may dial it: announced with our boot id,
    absolute, and named as our sockets are; else None."""
    if path is None or boot is None or boot != this_boot():
        return None
    return path if _is_ours(path) else None


def _is_ours(path: str) -> bool:
    return os.path.isabs(path) and os.path.basename(path) == SOCKET_NAME


async def open_local(
    path: str, peer_id: str, handle: str, *, timeout_s: float = HELLO_TIMEOUT_S
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to `handle` of the server `peer_id` listening at `path`.

    Raises:
        One of LINK_ERRORS: the path is not one of ours, nobody listens there, or the
        server there is another peer or does not answer in time.
    """
    if not _is_ours(path):
        raise PeerUnavailableError(f"{path!r} is not a volunteer block server's socket")
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout_s)
    try:
        writer.write(_hello(peer_id, handle))
        reply = await _read_hello(reader, timeout_s)
        if reply.peer_id != peer_id or reply.handle != handle:
            raise PeerUnavailableError(f"{path} is served by {reply.peer_id}, not {peer_id}")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def open_preferring_local(
    local_socket: str | None,
    peer_id: str,
    handle: str,
    through_p2p: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to `handle` of `peer_id`: on its local socket when there is one, else
    (and whenever that fails) the one `through_p2p` opens."""
    if local_socket is not None:
        try:
            return await open_local(local_socket, peer_id, handle)
        except LINK_ERRORS as exc:
            logger.info("no local link to %s (%s): going through p2p", peer_id, exc)
    return await through_p2p()


class LocalListener:
    """A block server's Unix socket: hands each link to the handler of the stream it asks for.

    Owns the task of every link it accepted; `close` ends them and removes the socket file.
    """

    def __init__(self, peer_id: str, handlers: Mapping[str, StreamHandler]) -> None:
        self.peer_id = peer_id
        self._handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None
        self._links: set[asyncio.Task[None]] = set()
        self.path: Path | None = None
        self._own_folder: Path | None = None
        self.links_served = 0
        """Links opened to a stream since start (not counting refused ones)."""

    async def start(self, folder: Path | None = None) -> None:
        """Listens at `SOCKET_NAME` in `folder` (replacing a stale socket file left there).

        By default, and where `folder` is too deep for a socket path, the folder is a
        private one (mode 0700) made in the temp folder: the path goes into the swarm's
        records, and one under the user's home would tell every peer the user's name.

        Raises:
            OSError: the socket cannot be bound.
        """
        path = None if folder is None else folder / SOCKET_NAME
        if path is None or len(os.fsencode(path)) > wire.MAX_SOCKET_PATH_CHARS:
            remove_stale_folders()
            self._own_folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
            path = self._own_folder / SOCKET_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # a crashed daemon's: connecting to it would fail anyway
        self._server = await asyncio.start_unix_server(self._accept, path=str(path))
        self.path = path
        # In a private folder nobody else could connect meanwhile; in another, this
        # closes the socket to others at once.
        path.chmod(0o600)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        links = list(self._links)
        for task in links:
            task.cancel()
        await asyncio.gather(*links, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), HELLO_TIMEOUT_S)
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.path = None
        if self._own_folder is not None:
            with contextlib.suppress(OSError):
                self._own_folder.rmdir()
            self._own_folder = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Served in a task of our own, which `close` may cancel: asyncio logs an error
        # when the task it runs this callback in ends cancelled.
        link = asyncio.create_task(self._serve(reader, writer), name="local-link")
        self._links.add(link)
        link.add_done_callback(self._links.discard)
        with contextlib.suppress(asyncio.CancelledError):
            await link

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await _read_hello(reader, HELLO_TIMEOUT_S)
        except LINK_ERRORS as exc:
            logger.debug("refused a local link: %s", exc)
            writer.close()
            return
        handler = self._handlers.get(hello.handle)
        if hello.peer_id != self.peer_id or handler is None:
            logger.debug("refused a local link to %s %s", hello.peer_id, hello.handle)
            writer.close()
            return
        writer.write(_hello(self.peer_id, hello.handle))
        self.links_served += 1
        try:
            await handler("local", reader, writer)
        finally:
            writer.close()


def remove_stale_folders(temp: Path | None = None) -> int:
    """Removes the private socket folders of this user's daemons that died without
    closing (killed, or the machine lost power mid-run); returns how many.

    A folder counts as stale when it holds nothing but a socket that refuses connections
    (nobody listens there any more), or nothing at all for an hour (a daemon that made it
    a moment ago is about to bind its socket there).
    """
    removed = 0
    for folder in Path(temp or tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        try:
            if folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            entries = list(folder.iterdir())
            if entries == [] and time.time() - folder.stat().st_mtime > STALE_EMPTY_S:
                folder.rmdir()
                removed += 1
            elif entries == [folder / SOCKET_NAME] and _refuses(folder / SOCKET_NAME):
                (folder / SOCKET_NAME).unlink()
                folder.rmdir()
                removed += 1
        except OSError:  # another process cleaned it up first, or it is not ours to touch
            continue
    return removed


def _refuses(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(HELLO_TIMEOUT_S)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def _hello(peer_id: str, handle: str) -> bytes:
    return framing.frame_bytes(wire.pack_metadata(LocalHello(peer_id=peer_id, handle=handle)))


async def _read_hello(reader: asyncio.StreamReader, timeout_s: float) -> LocalHello:
    """The other side's hello.

    Raises:
        One of LINK_ERRORS (a stream that ends early raises IncompleteReadError, an EOFError).
    """
    reading = framing.read_frame(reader, max_bytes=MAX_HELLO_BYTES)
    marker, body = await asyncio.wait_for(reading, timeout_s)
    if marker != P2P.MESSAGE_MARKER:
        raise PeerUnavailableError("the local link's hello is an error frame")
    return wire.unpack_metadata(body, LocalHello)
