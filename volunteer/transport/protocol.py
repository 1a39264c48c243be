"""The block-server RPC protocol, shared by the server (`handler`) and the client.

Every RPC travels in hivemind's `ExpertRequest` / `ExpertResponse` envelopes: tensors as
`runtime_pb2.Tensor` (hivemind's serializer, uncompressed) and metadata as msgpack bytes
checked against a pydantic schema below. Schemas ignore unknown fields, so a newer peer
can add fields without breaking an older one. Nothing here unpickles anything.

Errors a caller of a remote span can see::

    VolunteerError
    └── RemoteSpanError              root of the remote-call errors
        ├── RemoteError              the server answered with an error
        │   ├── BusyError            "busy:" no room now (KV-cache budget); retry elsewhere
        │   ├── BadRequestError      "bad request:" the request itself is wrong; a bug
        │   └── SessionExpiredError  "expired:" the session idled past the server's timeout
        └── PeerUnavailableError     no answer: connection refused or lost, or a timeout
            ├── IncompatiblePeerError  it answered in another protocol version
            └── BadReplyError          it answered, but not with a valid reply

The server raises `BusyError`, `BadRequestError` and `SessionExpiredError` itself: their
text starts with the marker above, hivemind carries the text to the caller inside a
`P2PHandlerError`, and `classify_remote_error` turns it back into the same class. The
client raises `IncompatiblePeerError` itself (`check_version`): to a router, a server it
cannot talk to is as good as one that is down.
"""

from __future__ import annotations

import unicodedata
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from volunteer.errors import VolunteerError

PROTOCOL_VERSION = 1
"""Sent in every `InfoReply`; a client uses no server whose version differs from its own."""
MAX_METADATA_BYTES = 32 << 10
"""Metadata is a handful of small fields (a step's route at most `MAX_PUSH_HOPS` of
them); anything larger is refused unparsed."""
MAX_ADAPTER_PROMPT_LEN = 1024
MAX_LORA_RANK = 256
MAX_SESSION_ID_CHARS = 128
MAX_PEER_ID_CHARS = 128
MAX_PUSH_HOPS = 64
MAX_SOCKET_PATH_CHARS = 107
"""The longest Unix socket path Linux takes (its sun_path holds 108 bytes with the NUL)."""
MAX_HANDLE_CHARS = 64
PUSH_SECRET_PATTERN = r"^[0-9a-f]{32,64}$"
"""A push secret: 16 to 32 random bytes in lowercase hex (`secrets.token_hex`)."""

# The server's handle names: hivemind names an RPC `rpc_x` of a servicer class `C` "C.rpc_x",
# and the client calls them by name (it never imports the server).
INFO_HANDLE = "BlockHandler.rpc_info"
FORWARD_HANDLE = "BlockHandler.rpc_forward"
BACKWARD_HANDLE = "BlockHandler.rpc_backward"
INFERENCE_HANDLE = "BlockHandler.rpc_inference"
"""The inference stream: the name and framing hivemind gives a stream RPC `rpc_inference`,
so hivemind's own stream callers reach it too."""
PUSH_HANDLE = "BlockHandler.push"
"""The stream handler that takes steps pushed by other servers."""


class RemoteSpanError(VolunteerError):
    """Root of the errors a call to a remote span can raise."""


class RemoteError(RemoteSpanError):
    """The server received the request and answered with an error."""

    marker = ""

    def __init__(self, reason: str) -> None:
        # The marker leads the text so that it survives hivemind's error transport.
        super().__init__(reason if reason.startswith(self.marker) else self.marker + reason)


class BusyError(RemoteError):
    """The server has no room for this request now (e.g. its KV-cache budget is full)."""

    marker = "busy: "


class BadRequestError(RemoteError):
    """The request is malformed or outside the server's limits; retrying cannot help."""

    marker = "bad request: "


class SessionExpiredError(RemoteError):
    """The server closed an inference session that sent nothing for too long."""

    marker = "expired: "


class PeerUnavailableError(RemoteSpanError):
    """The peer could not be reached, dropped the connection, or did not answer in time."""


class IncompatiblePeerError(PeerUnavailableError):
    """The peer answered, but in another protocol version than ours: it is not used."""


class BadReplyError(PeerUnavailableError):
    """The peer answered, but not with a valid reply: its own failure, not the caller's,
    so a router treats it as down and tries another replica."""


_MARKED_ERRORS: tuple[type[RemoteError], ...] = (BusyError, BadRequestError, SessionExpiredError)


def printable(text: str, *, keep_lines: bool = False, max_chars: int = 2000) -> str:
    """`text` from a peer, fit to show a person: control and format characters removed
    (a peer's text must not drive the terminal, e.g. move its cursor, or reorder what is
    shown with bidirectional overrides), at most max_chars long.

    Args:
        keep_lines: keep newlines and tabs (model output); otherwise they become spaces.
    """
    kept = []
    for char in text[: max_chars * 2]:
        if char in "\n\t":
            kept.append(char if keep_lines else " ")
        elif unicodedata.category(char) not in _HIDDEN_CATEGORIES:
            kept.append(char)
    return "".join(kept)[:max_chars]


_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
"""Control, format (bidi overrides, zero-width), surrogate, private-use, unassigned."""


def classify_remote_error(message: str) -> RemoteError:
    """Turns the text of a remote handler failure back into our error class.

    hivemind wraps a handler's exception as text: `str(exc)` after a prefix for streams,
    `repr(exc)` for unary calls. The marker is searched anywhere in that text.
    """
    for cls in _MARKED_ERRORS:
        index = message.find(cls.marker.strip())
        if index >= 0:
            reason = message[index:]
            if message.endswith(("')", '")')):  # repr(exc) of a unary handler's error
                reason = reason[:-2]
            return cls(reason)
    return RemoteError(message)


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class AdapterSpec(_Schema):
    """What a forward/backward call's adapter tensors are (`volunteer.models.adapters`):
    they follow the call's hidden states (and output gradient), stacked over its blocks."""

    prompt_len: int = Field(default=0, ge=0, le=MAX_ADAPTER_PROMPT_LEN)
    rank: int = Field(default=0, ge=0, le=MAX_LORA_RANK)
    targets: tuple[str, ...] = Field(default=(), max_length=8)
    scale: float = Field(default=1.0, allow_inf_nan=False)


class SpanRequest(_Schema):
    """Metadata of forward and backward: the blocks [start, end) to run, and the
    fine-tuning client's adapter for this call only, if any."""

    start: int = Field(ge=0)
    end: int = Field(ge=1)
    adapter: AdapterSpec | None = None


class OpenSessionRequest(SpanRequest):
    """First message of an inference stream: reserves a KV cache for the session."""

    session_id: str = Field(min_length=1, max_length=MAX_SESSION_ID_CHARS)
    max_length: int = Field(ge=1)
    """Most positions the session will ever hold (prompt plus generated tokens)."""
    batch_size: int = Field(ge=1)
    push_secret: str | None = Field(default=None, pattern=PUSH_SECRET_PATTERN)
    """The secret a push into this session must carry (`volunteer.server.push`); the
    client draws one per session and hands it only to the hop before this one. None:
    the session takes no pushes."""
    next_step_id: int = Field(default=1, ge=1)
    """The `StepRequest.step_id` of the session's first numbered step (a session opened
    by a failover starts mid-route); a push is taken only for the session's next step."""


class NextHop(_Schema):
    """A later server of the route, which a server pushes its step's output to."""

    peer_id: str = Field(min_length=1, max_length=MAX_PEER_ID_CHARS)
    session_id: str = Field(min_length=1, max_length=MAX_SESSION_ID_CHARS)
    local_socket: str | None = Field(default=None, max_length=MAX_SOCKET_PATH_CHARS)
    """The server's Unix socket, when the client saw it on this machine (see
    `volunteer.transport.local_link`)."""
    push_secret: str | None = Field(default=None, pattern=PUSH_SECRET_PATTERN)
    """The session's `OpenSessionRequest.push_secret`, for the push to carry."""


class LocalHello(_Schema):
    """The first message each way on a local link (`volunteer.transport.local_link`): the peer id
    the caller means to reach and the stream it wants; the server's answer names itself."""

    peer_id: str = Field(min_length=1, max_length=MAX_PEER_ID_CHARS)
    handle: str = Field(min_length=1, max_length=MAX_HANDLE_CHARS)


class StepRequest(_Schema):
    """A later message of an inference stream: one step, or the close.

    Also the message a server pushes to the next server of the route (see
    `volunteer.server.push`): then `session_id` is that server's session.
    """

    session_id: str = Field(min_length=1, max_length=MAX_SESSION_ID_CHARS)
    start_pos: int = Field(default=0, ge=0)
    """Position of the first new token; below the cached length it rewinds (replay)."""
    is_close: bool = False
    """Ends the session; the server frees its cache and ends the stream."""
    step_id: int = Field(default=0, ge=0)
    """The client's number for this step, rising through the session; a step numbered
    at or below the last one run is a copy of it (pushed and also sent by the client)
    and is dropped unanswered. 0: unnumbered, always run."""
    push_to: list[NextHop] = Field(default_factory=list, max_length=MAX_PUSH_HOPS)
    """The rest of the route: the output also goes straight to push_to[0] (with the
    hops after it), so the next server can start before the client relays it."""
    push_secret: str | None = Field(default=None, pattern=PUSH_SECRET_PATTERN)
    """In a push only: the receiving session's secret (`NextHop.push_secret`)."""


class StepReply(_Schema):
    """Metadata of an inference reply (the open's acknowledgement has length 0)."""

    session_id: str
    length: int
    """Positions cached after this step."""
    pushed: bool = False
    """The output also went to the next server of the route (`StepRequest.push_to`),
    which will answer the step without waiting for the client to send it."""
    max_chunk: int | None = Field(default=None, ge=1)
    """In the open's acknowledgement: the most positions one step of this session may
    carry (within max_chunk and max_tokens over its batch), so that a client replaying
    a history after a failover sends it in as few steps as the server takes."""
    certificate: bytes | None = Field(default=None, max_length=2048)
    """In the open's acknowledgement: the session's certificate, signed by the server's
    peer key in `certificate_signature` (`volunteer.transport.commitment`)."""
    certificate_signature: bytes | None = Field(default=None, max_length=1024)
    chain: bytes | None = Field(default=None, min_length=32, max_length=32)
    """In a step's reply: the session's chain over every step so far."""
    signature: bytes | None = Field(default=None, min_length=64, max_length=64)
    """The session key's signature of `chain`."""


class CallReply(_Schema):
    """Metadata of a forward/backward reply: a server that applied the call's adapter says
    so (one that ignored the field, as an older one would, must not pass for it)."""

    adapted: bool = False


class InfoReply(_Schema):
    """What a server says about itself in `rpc_info`."""

    version: int = PROTOCOL_VERSION
    model_name: str
    start: int
    end: int
    hidden_size: int
    dtype: str
    cache_tokens_total: int
    cache_tokens_left: int
    max_batch: int
    max_chunk: int
    max_tokens: int
    max_length: int
    throughput: float
    """Tokens per second this server expects to sustain (measured by its owner)."""


class VersionProbe(_Schema):
    """Only the version of an `InfoReply`, read before the rest: another version's
    fields need not fit our schema."""

    version: int | None = None


Schema = TypeVar("Schema", bound=_Schema)


def pack_metadata(schema: _Schema) -> bytes:
    """Encodes a metadata schema as msgpack bytes."""
    return msgpack.packb(schema.model_dump(), use_bin_type=True)


def unpack_metadata(raw: bytes, schema: type[Schema]) -> Schema:
    """Decodes and validates metadata.

    Raises:
        BadRequestError: the bytes are not msgpack, or do not fit the schema.
    """
    if len(raw) > MAX_METADATA_BYTES:
        raise BadRequestError(f"metadata of {len(raw)} bytes exceeds {MAX_METADATA_BYTES}")
    try:
        # Strings as keys only: a map with odd key types cannot fit any schema anyway.
        value: Any = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BadRequestError(f"metadata is not valid msgpack ({type(exc).__name__})") from exc
    if not isinstance(value, dict):
        raise BadRequestError(f"metadata must be a map, got {type(value).__name__}")
    try:
        return schema.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'metadata'}: {e['msg']}" for e in exc.errors()
        )
        raise BadRequestError(f"bad {schema.__name__} metadata: {problems}") from exc


def check_version(raw: bytes, *, peer: str) -> None:
    """Checks that the `InfoReply` metadata `raw` is in our protocol version.

    Raises:
        IncompatiblePeerError: it names another version, or none.
        BadRequestError: the bytes are not metadata at all.
    """
    version = unpack_metadata(raw, VersionProbe).version
    if version != PROTOCOL_VERSION:
        raise IncompatiblePeerError(
            f"{peer} speaks protocol version {version}, this peer speaks {PROTOCOL_VERSION}"
        )
