"""Open inference sessions on a block server and the KV-cache budget they share.

The table is used from the server's event loop only, so the budget needs no lock:
admission checks and reserves without awaiting in between.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import math

from volunteer.models.kv_cache import KVCache
from volunteer.models.model import BlockSpan
from volunteer.server.push import StepInbox
from volunteer.transport.protocol import BadRequestError, BusyError

RECENTLY_CLOSED = 1024
"""Closed sessions remembered, so that a push that arrives just after its session
closed is taken for the honest straggler it is, not for a guess (see `closed_lately`)."""


@dataclasses.dataclass
class Session:
    """One open inference session and the cache it holds on this server."""

    peer: str
    session_id: str
    start: int
    end: int
    batch_size: int
    max_length: int
    cache: KVCache | None = None
    """Allocated after admission; None until then."""
    span: BlockSpan | None = None
    """The blocks the session was opened on: it keeps running on them even after the
    server moves to other blocks (they are freed with the last such session)."""
    inbox: StepInbox | None = None
    """Where steps pushed by other servers go (None: the session takes no pushes)."""
    push_secret: str | None = None
    """What a push into this session must carry (`OpenSessionRequest.push_secret`)."""
    last_step_id: int = 0
    """The highest client step number run so far (see `StepRequest.step_id`)."""
    expires_at: float = math.inf
    """When (`time.monotonic`) the session has lived its `max_session_s`: a step after
    it ends the session."""

    @property
    def key(self) -> tuple[str, str]:
        # Scoped by peer so that one client cannot close or collide with another's session.
        return (self.peer, self.session_id)

    @property
    def cache_tokens(self) -> int:
        return self.batch_size * self.max_length


class SessionTable:
    """Open sessions, and the cached token positions they hold against the budget."""

    def __init__(self, *, cache_tokens: int) -> None:
        self.cache_tokens_total = cache_tokens
        self._sessions: dict[tuple[str, str], Session] = {}
        self._by_id: dict[str, Session | None] = {}
        """For pushes, which name a session by id only; None where two peers chose
        the same id (no pushes for either)."""
        self._closed: collections.OrderedDict[str, str] = collections.OrderedDict()
        """The push secrets of the last RECENTLY_CLOSED sessions that took pushes, by id."""

    @property
    def cache_tokens_used(self) -> int:
        return sum(session.cache_tokens for session in self._sessions.values())

    @property
    def cache_tokens_left(self) -> int:
        return self.cache_tokens_total - self.cache_tokens_used

    def __len__(self) -> int:
        return len(self._sessions)

    def admit(self, session: Session) -> None:
        """Reserves the session's cache tokens.

        Raises:
            BadRequestError: the same peer already has a session with this id open.
            BusyError: the budget has no room for the session now.
        """
        if session.key in self._sessions:
            raise BadRequestError(f"session {session.session_id!r} is already open")
        left = self.cache_tokens_left
        if session.cache_tokens > left:
            raise BusyError(
                f"session needs {session.cache_tokens} cache tokens (batch * max_length), "
                f"server has {left} of {self.cache_tokens_total} free"
            )
        self._sessions[session.key] = session
        self._by_id[session.session_id] = None if session.session_id in self._by_id else session

    def find_for_push(self, session_id: str) -> Session | None:
        """The open session with this id, unless none or several have it."""
        return self._by_id.get(session_id)

    def closed_lately(self, session_id: str, secret: str | None) -> bool:
        """Whether a recently closed session had this id and push secret: a push for it
        comes from a server of its route, a moment late."""
        known = self._closed.get(session_id)
        return known is not None and secret is not None and hmac.compare_digest(known, secret)

    def release(self, session: Session) -> None:
        """Returns the session's tokens to the budget (idempotent).

        The cache itself goes with the session object: a step still running on the
        compute thread may hold it a moment longer.
        """
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
            if session.push_secret is not None:
                self._closed[session.session_id] = session.push_secret
                self._closed.move_to_end(session.session_id)
                if len(self._closed) > RECENTLY_CLOSED:
                    self._closed.popitem(last=False)
            if self._by_id.get(session.session_id) is session:
                del self._by_id[session.session_id]
            # An id two peers chose stays closed to pushes until all its sessions are gone.
            elif all(each.session_id != session.session_id for each in self._sessions.values()):
                self._by_id.pop(session.session_id, None)

    def release_all(self) -> None:
        for session in list(self._sessions.values()):
            self.release(session)
