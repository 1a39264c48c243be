"""Typed DHT records of the swarm and a read-only view of them (`SwarmSnapshot`).

Every server announces one `ServerInfo` per block it serves, under `block_key(model, i)`.
Records come from strangers, so they are validated on read: strict types, caps on every
number and string, `0 <= start < end`. Fields this version does not know are ignored, so
a newer peer that adds fields does not break an older one. Errors::

    VolunteerError
    └── RecordError     a record from the DHT is malformed (wrong type, out of range)
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import pydantic

from volunteer.errors import VolunteerError
from volunteer.scheduler.block_selection import ServerSpan, choose_best_start, claim_cap
from volunteer.transport.protocol import MAX_SOCKET_PATH_CHARS

SCHEMA_VERSION = 1
MAX_BLOCKS = 100_000
"""No model has this many blocks; a larger index is a lie or a bug."""
MAX_RATE = 1e9
"""Cap on throughput and request rates: far above any real server."""
MAX_CACHE_TOKENS = 2**40
MAX_PUBLIC_NAME_CHARS = 64
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,127}$")
"""A Hugging Face repo id or a registered short name: no spaces, no control characters."""
_TOKEN_RE = r"^[A-Za-z0-9][A-Za-z0-9._+\-]{0,63}$"
WEIGHTS_SHA256_RE = r"^[0-9a-f]{64}$"
_CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class RecordError(VolunteerError):
    """A record read from the DHT is malformed; the message names the problem."""


class ServerState(str, enum.Enum):
    """Where a server is in its life: loading blocks, serving, handing its blocks over
    before it leaves (clients use it only where no other server can), or gone."""

    JOINING = "joining"
    ONLINE = "online"
    LEAVING = "leaving"
    OFFLINE = "offline"


_STATE_RANK = {ServerState.ONLINE: 3, ServerState.LEAVING: 2, ServerState.JOINING: 1}
"""Which of a peer's records describes it (`SwarmSnapshot.spans`): a server moving to
new blocks is JOINING there while still ONLINE on its old ones."""


_Rate = Annotated[float, pydantic.Field(ge=0.0, le=MAX_RATE, allow_inf_nan=False)]


def check_model_name(model: str) -> str:
    """Returns `model` if its characters are allowed in a DHT key, else raises RecordError."""
    if not isinstance(model, str) or not MODEL_NAME_RE.fullmatch(model):
        raise RecordError(
            f"bad model name {model!r}: use 1-128 letters, digits, '.', '_', '-' or '/', "
            f"starting with a letter or digit"
        )
    return model


def block_key(model: str, index: int) -> str:
    """The DHT key under which the servers of block `index` of `model` announce themselves.

    Raises:
        RecordError: the model name has characters we do not allow, or `index` is out of range.
    """
    check_model_name(model)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_BLOCKS:
        raise RecordError(f"bad block index {index!r}: must be an int in [0, {MAX_BLOCKS})")
    return f"{model}.block{index}"


class WireRecord(pydantic.BaseModel):
    """A record that comes from strangers: frozen, strictly typed, and a newer peer's
    extra fields ignored."""

    # strict: a peer sending "5" for an int is broken or probing us; don't guess.
    model_config = pydantic.ConfigDict(frozen=True, extra="ignore", strict=True)
    RECORD_NAME: typing.ClassVar[str] = "record"
    """What errors call it."""

    def to_wire(self) -> dict[str, Any]:
        """This record as plain msgpack-able values (str, int, float, None, lists)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, value: object) -> typing.Self:
        """Validates a record read from the DHT.

        Raises:
            RecordError: `value` is not a dict of valid fields; the message says which.
        """
        if not isinstance(value, dict):
            raise RecordError(f"a {cls.RECORD_NAME} must be a dict, got {type(value).__name__}")
        try:
            return cls.model_validate(value)
        except pydantic.ValidationError as exc:
            raise RecordError(f"bad {cls.RECORD_NAME}: {_first_problem(exc)}") from None


class ServerInfo(WireRecord):
    """What a server says about itself, once per block of its span `[start, end)`."""

    RECORD_NAME = "server record"

    schema_version: int = pydantic.Field(default=SCHEMA_VERSION, ge=1, le=2**16)
    # JSON-style enum input ("online") is what arrives from the wire, so not strict here.
    state: Annotated[ServerState, pydantic.Field(strict=False)]
    start: int = pydantic.Field(ge=0, lt=MAX_BLOCKS)
    end: int = pydantic.Field(gt=0, le=MAX_BLOCKS)
    throughput: _Rate
    """Tokens per second per block this server can sustain."""
    inference_rps: _Rate | None = None
    """Inference steps per second (measured), if known."""
    forward_rps: _Rate | None = None
    """Forward passes per second (measured), if known."""
    dtype: str = pydantic.Field(pattern=_TOKEN_RE)
    """Weights' dtype or quantization, e.g. "bfloat16" or "q4_1"."""
    cache_tokens_left: int = pydantic.Field(ge=0, le=MAX_CACHE_TOKENS)
    version: str = pydantic.Field(pattern=_TOKEN_RE)
    """The volunteer package version the server runs."""
    public_name: str | None = pydantic.Field(default=None, max_length=MAX_PUBLIC_NAME_CHARS)
    model: str = pydantic.Field(pattern=MODEL_NAME_RE.pattern)
    local_socket: str | None = pydantic.Field(default=None, max_length=MAX_SOCKET_PATH_CHARS)
    """The server's Unix socket, for processes of the same boot
    (`volunteer.transport.local_link`)."""
    boot_id: str | None = pydantic.Field(default=None, pattern=_TOKEN_RE)
    """The id of the boot of the machine the server runs on (with `local_socket`)."""
    weights_sha256: str | None = pydantic.Field(default=None, pattern=WEIGHTS_SHA256_RE)
    """The hash of the weights it serves (`volunteer.model_cache.weights_hash`); None: an
    older peer that does not say, which no route or placement counts on."""
    device_class: str | None = pydantic.Field(default=None, pattern=_TOKEN_RE)
    """What it computes on, "cpu" or "gpu": bounds how fast it can plausibly be
    (`volunteer.scheduler.claims`); None or an unknown class is bounded as the fastest."""

    @pydantic.field_validator("public_name")
    @classmethod
    def _printable_name(cls, name: str | None) -> str | None:
        # Names end up in terminals: escape sequences could redraw someone's screen.
        if name is not None and _CONTROL_CHARS_RE.search(name):
            raise ValueError("public_name must not contain control characters")
        return name

    @pydantic.model_validator(mode="after")
    def _span_is_ordered(self) -> ServerInfo:
        if self.start >= self.end:
            raise ValueError(f"span [{self.start}, {self.end}) is empty: start must be < end")
        return self


def _first_problem(exc: pydantic.ValidationError) -> str:
    # One short line is enough for a log; the full error may echo a huge hostile value.
    error = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "record"
    return f"{where}: {error['msg']} ({exc.error_count()} problem(s))"


@dataclasses.dataclass(frozen=True)
class SwarmSnapshot:
    """Who serves which block of one model, as read from the DHT at one moment.

    Attributes:
        model: the model these blocks belong to.
        blocks: for each block index, the servers announced for it: peer id -> record.
    """

    model: str
    blocks: tuple[Mapping[str, ServerInfo], ...]

    @classmethod
    def build(
        cls, model: str, num_blocks: int, entries: Iterable[tuple[int, str, ServerInfo]]
    ) -> SwarmSnapshot:
        """Groups `(block index, peer id, record)` entries by block.

        Raises:
            ValueError: an entry's block index is outside `[0, num_blocks)`.
        """
        per_block: list[dict[str, ServerInfo]] = [{} for _ in range(num_blocks)]
        for index, peer_id, info in entries:
            if not 0 <= index < num_blocks:
                raise ValueError(f"block {index} is outside [0, {num_blocks})")
            per_block[index][peer_id] = info
        # Sorted by peer id so that iteration (and float sums) do not depend on DHT order.
        frozen = tuple(types.MappingProxyType(dict(sorted(b.items()))) for b in per_block)
        return cls(model=model, blocks=frozen)

    def to_json(self) -> dict[str, Any]:
        """The swarm as plain JSON data (for the control API): one record per peer, and
        each block's summed throughput."""
        return {
            "model": self.model,
            "num_blocks": len(self.blocks),
            "block_throughput": self.block_throughput(),
            "servers": [
                {"peer_id": peer_id, **info.to_wire()} for peer_id, info in self.spans().items()
            ],
        }

    @classmethod
    def from_json(cls, data: object) -> SwarmSnapshot:
        """A snapshot from `to_json` data, each record on every block of its span.

        Raises:
            RecordError: the data is malformed.
        """
        fields = data if isinstance(data, dict) else {}
        model, num_blocks = fields.get("model"), fields.get("num_blocks")
        servers = fields.get("servers")
        if not (
            isinstance(model, str)
            and isinstance(num_blocks, int)
            and num_blocks >= 0
            and isinstance(servers, list)
        ):
            raise RecordError("a swarm description needs model, num_blocks and a servers list")
        entries = []
        for item in servers:
            if not isinstance(item, dict) or not isinstance(item.get("peer_id"), str):
                raise RecordError("each server needs a peer_id")
            info = ServerInfo.from_wire({k: v for k, v in item.items() if k != "peer_id"})
            entries += [(index, item["peer_id"], info) for index in range(info.start, info.end)]
        try:
            return cls.build(model, num_blocks, entries)
        except ValueError as exc:
            raise RecordError(str(exc)) from None

    def without(self, peer_id: str) -> SwarmSnapshot:
        """The same swarm without `peer_id`'s records (e.g. a restarted server's own old
        ones, which must not count as someone else serving)."""
        blocks = tuple(
            types.MappingProxyType({p: i for p, i in servers.items() if p != peer_id})
            for servers in self.blocks
        )
        return dataclasses.replace(self, blocks=blocks)

    def with_weights(self, weights_sha256: str, dtype: str | None = None) -> SwarmSnapshot:
        """The same swarm with only the records of servers serving these weights (in this
        form, if given: `ServerInfo.dtype`): peers with other weights under the model's
        name (or that do not say) cannot share a route or a placement with ours."""
        blocks = tuple(
            types.MappingProxyType(
                {
                    p: i
                    for p, i in servers.items()
                    if i.weights_sha256 == weights_sha256 and dtype in (None, i.dtype)
                }
            )
            for servers in self.blocks
        )
        return dataclasses.replace(self, blocks=blocks)

    def servers_for_block(self, index: int) -> Mapping[str, ServerInfo]:
        """Peer id -> record for the servers that announced block `index`."""
        if not 0 <= index < len(self.blocks):
            raise IndexError(f"block {index} is outside [0, {len(self.blocks)})")
        return self.blocks[index]

    def spans(self) -> dict[str, ServerInfo]:
        """One record per peer, sorted by peer id: the record from its lowest block in
        the most serving state it has (online, leaving, joining, offline). (A server that
        moved leaves OFFLINE records on the blocks it left, and one moving is JOINING on
        the blocks it loads.)"""
        found: dict[str, ServerInfo] = {}
        for servers in self.blocks:
            for peer_id, info in servers.items():
                rank = _STATE_RANK.get(info.state, 0)
                if peer_id not in found or rank > _STATE_RANK.get(found[peer_id].state, 0):
                    found[peer_id] = info
        return dict(sorted(found.items()))

    def claim_cap(self) -> float:
        """The most one online server's claimed throughput counts for placement
        (`volunteer.scheduler.block_selection.claim_cap` over the online claims)."""
        online = self._online_spans()
        return claim_cap([info.throughput for info in online.values()])

    def block_throughput(self) -> list[float]:
        """For each block, the capacity placement counts: the summed throughput of the
        online servers, each claim capped (`claim_cap`). JOINING records do not count:
        clients route to no joining server, so fake ones could steer servers away."""
        cap = self.claim_cap()
        return [
            math.fsum(
                min(info.throughput, cap)
                for info in servers.values()
                if info.state is ServerState.ONLINE
            )
            for servers in self.blocks
        ]

    def _online_spans(self) -> dict[str, ServerInfo]:
        return {p: i for p, i in self.spans().items() if i.state is ServerState.ONLINE}

    def weakest_span(self, num_blocks: int, rng: random.Random | None = None) -> tuple[int, int]:
        """Where a server of `num_blocks` blocks should join: the window where the swarm
        is weakest (`volunteer.scheduler.block_selection.choose_best_start`).

        Sums are exactly rounded (`math.fsum`) in peer order, so the same snapshot always
        gives the same answer; ties go to the lowest start, or to `rng`'s pick.

        Returns:
            `(start, end)` of that window.

        Raises:
            ValueError: `num_blocks` is not in `[1, number of blocks]`.
        """
        total = len(self.blocks)
        if not 1 <= num_blocks <= total:
            raise ValueError(f"num_blocks must be in [1, {total}], got {num_blocks}")
        start = choose_best_start(self.block_throughput(), num_blocks, rng)
        return start, start + num_blocks

    def server_spans(self) -> list[ServerSpan]:
        """The online servers as placement counts them (claims capped, as in
        `block_throughput`), in peer-id order."""
        online, cap = self._online_spans(), self.claim_cap()
        return [
            ServerSpan(peer_id, info.start, info.end, min(info.throughput, cap))
            for peer_id, info in online.items()
        ]
