"""Serving and fetching evidence by its name, over a p2p stream.

An accuser keeps the evidence of its accusations (`EvidenceStore`, bounded) and serves
it to any peer that names it (`EVIDENCE_HANDLE`): the request is one frame holding the
evidence's sha256 in hex; the answer, the evidence's bytes in frames of at most
`CHUNK_BYTES`, then the end of the stream (at once: evidence it does not hold). The
fetcher reads within `MAX_EVIDENCE_BYTES` and a deadline, and takes the bytes only if
they hash to the name it asked for: a hostile accuser can waste one bounded fetch, not
mislead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

from volunteer.errors import VolunteerError
from volunteer.transport import framing
from volunteer.transport.p2p_streams import open_stream
from volunteer.trust.evidence import MAX_EVIDENCE_BYTES, evidence_id

EVIDENCE_HANDLE = "Trust.evidence"
CHUNK_BYTES = 1 << 20
REQUEST_TIMEOUT_S = 5.0
MAX_KEPT = 64
MAX_KEPT_BYTES = 512 << 20
SERVE_DEADLINE_S = 30.0
"""The longest one evidence answer may take (64 MiB at about 2 MiB/s)."""
MAX_SERVING = 4
"""Evidence streams served at once; more are closed unanswered (each is bounded by the
fetcher's deadline)."""

logger = logging.getLogger(__name__)


class EvidenceFetchError(VolunteerError):
    """The accuser did not hand over the evidence it named, in time and within bounds."""


class EvidenceStore:
    """The evidence this peer can hand out, by name: the latest `MAX_KEPT`, within
    `MAX_KEPT_BYTES` (an accusation older than that is past judging anyway)."""

    def __init__(self, *, max_kept: int = MAX_KEPT, max_bytes: int = MAX_KEPT_BYTES) -> None:
        self.max_kept, self.max_bytes = max_kept, max_bytes
        self._kept: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._serving = asyncio.Semaphore(MAX_SERVING)

    def add(self, raw: bytes) -> str:
        """Keeps evidence bytes; their name."""
        name = evidence_id(raw)
        self._kept[name] = raw
        self._kept.move_to_end(name)
        while (
            len(self._kept) > self.max_kept or sum(map(len, self._kept.values())) > self.max_bytes
        ):
            if len(self._kept) == 1:
                break  # the newest stays, however large: it was just filed
            self._kept.popitem(last=False)
        return name

    def get(self, name: str) -> bytes | None:
        return self._kept.get(name)

    async def serve(
        self, _info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """The `EVIDENCE_HANDLE` stream handler."""
        with contextlib.closing(writer):
            try:
                _, body = await asyncio.wait_for(
                    framing.read_frame(reader, max_bytes=128), REQUEST_TIMEOUT_S
                )
                raw = self.get(body.decode("ascii", errors="replace"))
                if raw is None or self._serving.locked():
                    return  # unknown, or busy: the fetcher asks again in a later round
                async with self._serving:
                    # One deadline for the whole answer: a slow reader cannot hold a slot.
                    await asyncio.wait_for(_send(raw, writer), SERVE_DEADLINE_S)
            except Exception as exc:  # a peer that went away or sent junk: nothing to tell
                logger.debug("an evidence request failed: %s", exc)


async def _send(raw: bytes, writer: asyncio.StreamWriter) -> None:
    for offset in range(0, len(raw), CHUNK_BYTES):
        writer.write(framing.frame_bytes(raw[offset : offset + CHUNK_BYTES]))
        await writer.drain()


async def fetch_evidence(p2p: P2P, peer_id: str, name: str, *, timeout_s: float) -> bytes:
    """The evidence `name` from `peer_id`.

    Raises:
        EvidenceFetchError: unreachable, too slow, too large, or not the evidence named.
    """
    try:
        return await asyncio.wait_for(_fetch(p2p, peer_id, name), timeout_s)
    except EvidenceFetchError:
        raise
    except Exception as exc:  # the daemon's, the stream's and the wait's many errors
        raise EvidenceFetchError(
            f"{peer_id} did not hand over evidence {name[:12]}: {exc!r}"
        ) from None


async def _fetch(p2p: P2P, peer_id: str, name: str) -> bytes:
    _, reader, writer = await open_stream(p2p, PeerID.from_base58(peer_id), EVIDENCE_HANDLE)
    with contextlib.closing(writer):
        writer.write(framing.frame_bytes(name.encode("ascii")))
        await writer.drain()
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                marker, body = await framing.read_frame(reader, max_bytes=CHUNK_BYTES)
            except asyncio.IncompleteReadError:
                break
            if marker == P2P.ERROR_MARKER:
                break
            size += len(body)
            if size > MAX_EVIDENCE_BYTES:
                raise EvidenceFetchError(f"{peer_id} sent over {MAX_EVIDENCE_BYTES} bytes")
            chunks.append(body)
    raw = b"".join(chunks)
    if hashlib.sha256(raw).hexdigest() != name:
        raise EvidenceFetchError(f"{peer_id} sent bytes that are not evidence {name[:12]}")
    return raw
