"""The control API's methods: each one's name, params and reply, as pydantic models.

Defined once here and shared by the daemon (its `ControlServer` validates the params
of each request), the CLI and the TUI (their `ControlClient` validates each reply).
Replies ignore fields they do not know: a newer daemon may add some. The status reply
is flat on the wire (`volunteer status --json` prints it as it is) and is made of one
part per service: `DaemonStatus`, `DHTStatus`, `ServingStatus` and `ChatStatus`.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Generic, Literal, TypeVar

import pydantic

MAX_MESSAGES = 1000
MAX_NEW_TOKENS = 32768
MAX_SERIES_POINTS = 512  # a fine-tuning job's series are thinned to at most this many
PAUSED_NOTE = "paused by you: not taking new sessions"

DaemonState = Literal[
    "not_running", "starting", "joining", "serving", "paused", "rebalancing", "stopping",
    "failed",
]  # fmt: skip
"""`starting` and `not_running` are the CLI's words for a daemon that does not answer
yet (its pid file exists) or at all; the daemon itself says the others."""
FinetuneState = Literal["idle", "running", "stopping", "done", "stopped", "failed"]
AdapterName = Annotated[str, pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
"""As `volunteer.finetune.adapter_info.valid_name` allows (no name climbs out of the store)."""
Series = Annotated[list[tuple[int, float]], pydantic.Field(max_length=2 * MAX_SERIES_POINTS)]


class Reply(pydantic.BaseModel):
    """A reply from the daemon: unknown fields are ignored, nothing is changed after."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)


class Params(pydantic.BaseModel):
    """A request's params."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)


class NoParams(Params):
    """For the methods that take nothing."""


class SwarmParams(Params):
    is_ping: bool = pydantic.Field(default=False, alias="ping")
    """Also measure each serving peer's round trip from the daemon."""

    model_config = pydantic.ConfigDict(populate_by_name=True)


class ChatMessage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Params):
    """The `chat` method's params; unknown fields are refused (a misspelt option)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    messages: Annotated[list[ChatMessage], pydantic.Field(min_length=1, max_length=MAX_MESSAGES)]
    max_new_tokens: int = pydantic.Field(default=512, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int | None = None
    model: str | None = None
    """Must be the daemon's model when given (it is the only one it holds)."""
    verify: Literal["off", "sample", "all"] | None = None
    """How the servers' steps are checked (None: as the daemon's `verify` setting)."""
    adapter: AdapterName | None = None
    """Answer with this fine-tuned adapter of the daemon's (None: the base model)."""


class FinetuneRequest(Params):
    """`finetune_start`: a run's settings, as `volunteer finetune`'s flags (unknown fields
    are refused; the daemon checks the rest as the CLI does)."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    data: str = pydantic.Field(min_length=1, max_length=4096)
    """The JSONL file, as an absolute path on the daemon's machine."""
    name: AdapterName
    method: Literal["ptune", "deep_ptune", "lora"] = "lora"
    steps: int = pydantic.Field(default=100, ge=1, le=1_000_000)
    lr: float | None = pydantic.Field(default=None, gt=0, le=10)
    batch_size: int = pydantic.Field(default=8, ge=1, le=4096)
    rank: int = pydantic.Field(default=8, ge=1, le=256)
    alpha: float = pydantic.Field(default=16.0, gt=0, le=1e6)
    prompt_len: int = pydantic.Field(default=16, ge=1, le=256)
    heldout_every: int = pydantic.Field(default=10, ge=1, le=1_000_000)
    seed: int = pydantic.Field(default=0, ge=0, le=2**63 - 1)
    model: str | None = None
    """Must be the daemon's model when given (it trains the model it holds)."""


class FinetuneStatusParams(Params):
    name: AdapterName | None = None  # None: the current or last job; another name: idle


class FinetuneJob(Reply):
    """`finetune_start`, `finetune_status` and `finetune_stop`: the daemon's current or
    last fine-tuning job (one runs at a time). Series are (step, value), thinned."""

    name: str | None = None
    state: FinetuneState = "idle"
    method: str | None = None
    data: str | None = None
    step: int = 0
    steps: int = 0
    loss: float | None = None
    heldout_loss: float | None = None
    tokens_per_s: float = 0.0
    losses: Series = []
    heldout: Series = []
    speeds: Series = []
    error: str | None = None  # why it failed
    adapter: str | None = None  # the adapter it saved, once done


class AdapterRow(Reply):
    name: str
    method: str | None = None
    steps: int = 0
    heldout_loss: float | None = None
    is_broken: bool = False
    reason: str | None = None  # what is wrong with a broken one


class AdaptersReply(Reply):
    """`adapters`: the daemon's stored adapters, by name."""

    adapters: list[AdapterRow] = []


class DaemonStatus(Reply):
    """The daemon's own part of `status`."""

    state: DaemonState
    error: str | None = None
    pid: int | None = None
    version: str | None = None
    uptime_s: float | None = None
    model: str | None = None
    public_name: str | None = None
    restart_needed: list[str] = []
    """Settings changed in config.toml that only a restart applies."""
    faults: str | None = None
    """Drill faults this daemon commits on purpose (`volunteer.faults`); None: none."""


class DHTStatus(Reply):
    """The DHT service's part of `status`."""

    peer_id: str | None = None
    multiaddrs: list[str] = []
    peers_seen: int = 0
    """Other peers in the routing table."""
    new_swarm: bool = False
    is_partitioned: bool = False
    """The daemon had peers and has none now: it is dialling the known ones again."""


class ServingStatus(Reply):
    """The block service's part of `status` (the defaults: serving no blocks)."""

    blocks: tuple[int, int] | None = None
    swarm_model: str | None = None
    requests_served: int = 0
    tokens_served: int = 0
    open_sessions: int = 0
    local_links: int | None = None
    """Streams taken on the local socket; None: no local socket."""
    cache_tokens_total: int | None = None
    cache_tokens_left: int | None = None
    throughput: float | None = None
    threads: int | None = None
    decode_threads: int | None = None
    span_reason: str | None = None
    is_paused: bool = False
    rebalancing: bool = False
    """Loading the blocks it moves to."""
    moves: int = 0
    """Moves to other blocks, periodic and hole-filling together."""
    hole_moves: int = 0
    """Of `moves`, those that filled a hole (blocks no server held)."""
    swarm_hole: str | None = None
    """The first blocks ("start:end") no live server held at the last look (None: none)."""
    leaving: bool = False
    """Handing blocks no other server holds over before it stops or pauses."""
    last_rebalance_check: str | None = None


class ChatStatus(Reply):
    """The chat service's part of `status`."""

    chats_active: int = 0
    chats_answered: int = 0


class TrustStatus(Reply):
    """The trust service's part of `status`: what this daemon's checks found."""

    peers_checked: int = 0
    peers_banned: int = 0
    checks_passed: int = 0
    checks_failed: int = 0
    accusations_filed: int = 0
    """Accusations this daemon published (its own proofs and endorsements)."""
    accusations_upheld: int = 0
    """Others' accusations this daemon recomputed and found true (the accused banned)."""
    accusations_refuted: int = 0
    """Others' accusations found false (the accuser banned)."""


class CreditStatus(Reply):
    """The credit service's part of `status`: this daemon's credit as its own receipts
    count it, and its rank on the board it audited."""

    credit_total: float | None = None
    credit_recent: float | None = None
    """Recent average credit (credits per day, one-week half-life)."""
    credit_held: float | None = None
    """Of the total, what escrow holds until this identity has a record of checks."""
    credit_rank: int | None = None
    """Its rank on this daemon's board (None: not on it yet)."""
    receipts_kept: int = 0
    receipts_refused: int = 0
    """Receipts refused since start (forged, replayed, for work not done here...)."""
    board_size: int = 0


class BoardRow(Reply):
    """One server on the leaderboard, as this daemon audited it."""

    rank: int
    peer_id: str
    public_name: str | None = None
    recent_average: float
    total: float
    held: float = 0.0
    forfeited: bool = False
    """Banned here while its credit was held: the held credit is lost."""
    blocks: tuple[int, int] | None = None
    block_tokens: int = 0
    uptime_share: float = 0.0
    reputation: float = 0.5
    """Its standing in this daemon's own checks (`volunteer peers`)."""
    audited_s: float = 0.0
    is_self: bool = False
    dropped: str | None = None
    """Why its latest summary failed this daemon's audit (the row shows the one before)."""


class LeaderboardReply(Reply):
    """`leaderboard`: every server whose summary passed this daemon's audit, by rank."""

    rows: list[BoardRow] = []
    own_peer_id: str | None = None
    history: list[float] = []
    """This daemon's credit per day, oldest first (the last is today)."""


class PeerReport(Reply):
    """One peer as this daemon knows it: its record (if serving) and its checks."""

    peer_id: str
    public_name: str | None = None
    blocks: tuple[int, int] | None = None
    state: str | None = None
    """Its record's state; None: no record of it now."""
    standing: float
    """0 (failed checks only) to 1 (many passed): routing prefers the higher."""
    passed: int = 0
    failed: int = 0
    banned_until_s: float | None = None
    """Unix time its ban ends; None: not banned."""
    ban_reason: str | None = None


class PeersReply(Reply):
    """`peers`: every peer in the model's records or in this daemon's checks."""

    peers: list[PeerReport] = []


class StatusReply(ServingStatus, DHTStatus, ChatStatus, TrustStatus, CreditStatus, DaemonStatus):
    """`status`: every service's part, flat."""

    @classmethod
    def assemble(cls, own: DaemonStatus, parts: list[Reply]) -> StatusReply:
        """The daemon's part and its services' parts in one reply; while it serves, a
        pause or a move is its state."""
        values: dict[str, Any] = dict(own)
        for part in parts:
            values.update(part)
        status = cls.model_validate(values)
        if status.state != "serving":
            return status
        if status.is_paused:
            return status.model_copy(update={"state": "paused", "error": PAUSED_NOTE})
        if status.rebalancing:
            return status.model_copy(update={"state": "rebalancing"})
        return status


class ReloadReply(Reply):
    """`reload_config`: which changed settings apply now, which on restart, and which
    edits of the file a flag or `VOLUNTEER_` variable of the daemon overrides."""

    applied: list[str] = []
    restart_needed: list[str] = []
    overridden: list[str] = []


class StopParams(Params):
    """`stop`: with `now`, no hand-over of blocks that no other server holds."""

    now: bool = False


class StopReply(Reply):
    stopping: bool = True
    grace_s: float = 0.0
    """The longest the daemon may hand its blocks over before it exits."""


class PauseReply(Reply):
    """`pause` / `resume`: the state now, and whether the DHT took the new record."""

    paused: bool
    announced: bool
    handing_over: list[str] = []
    """Blocks ("start:end") no other server holds: served, announced LEAVING, until
    another server takes them or the grace runs out; then the pause takes effect."""


class SwarmServer(Reply):
    """One server's record in `swarm`. The record's other fields come along as they
    are (`SwarmSnapshot.from_json` checks them as the DHT record they were)."""

    model_config = pydantic.ConfigDict(extra="allow")

    peer_id: str
    start: int
    end: int
    state: Literal["joining", "online", "offline"]
    throughput: float = 0.0
    public_name: str | None = None
    version: str | None = None
    rtt_s: float | None = None
    """The round trip from the daemon (with `ping`); None: not measured or no answer."""


class SwarmReply(Reply):
    """`swarm`: who serves which block of the daemon's model (`SwarmSnapshot.to_json`)."""

    model: str
    num_blocks: int = pydantic.Field(ge=0)
    block_throughput: list[float] = []
    servers: list[SwarmServer] = []


class RouteHop(Reply):
    peer_id: str
    start: int
    end: int


class ChatText(Reply):
    """A piece of a chat reply's text."""

    text: str


class ChatNotice(Reply):
    """A word on a chat reply under way, e.g. the blocks it waits for while the swarm
    repairs a hole; chat UIs show it beside the reply, not in it."""

    notice: str


class ChatStats(Reply):
    """The last message of a chat reply: what it took (chat UIs show it under it)."""

    done: Literal[True] = True
    tokens: int
    seconds: float
    route: list[RouteHop] = []


P = TypeVar("P", bound=Params)
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class Method(Generic[P, R]):
    """A control method: its name, its params model and its reply (or stream item) type."""

    name: str
    params: type[P]
    reply: Any
    """A model, or a union of models (a stream's items)."""
    is_stream: bool = False
    _adapter: pydantic.TypeAdapter[R] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_adapter", pydantic.TypeAdapter(self.reply))

    def parse_reply(self, data: Any) -> R:
        """Raises `pydantic.ValidationError` where `data` is not a valid reply."""
        return self._adapter.validate_python(data)

    def dump_reply(self, reply: R) -> Any:
        """`reply` as JSON-able data."""
        return self._adapter.dump_python(reply, mode="json", by_alias=True)


STATUS = Method("status", NoParams, StatusReply)
STOP = Method("stop", StopParams, StopReply)
RELOAD = Method("reload_config", NoParams, ReloadReply)
PAUSE = Method("pause", NoParams, PauseReply)
RESUME = Method("resume", NoParams, PauseReply)
SWARM = Method("swarm", SwarmParams, SwarmReply)
PEERS = Method("peers", NoParams, PeersReply)
LEADERBOARD = Method("leaderboard", NoParams, LeaderboardReply)
FINETUNE_START = Method("finetune_start", FinetuneRequest, FinetuneJob)
FINETUNE_STATUS = Method("finetune_status", FinetuneStatusParams, FinetuneJob)
FINETUNE_STOP = Method("finetune_stop", NoParams, FinetuneJob)
ADAPTERS = Method("adapters", NoParams, AdaptersReply)
CHAT: Method[ChatRequest, ChatText | ChatNotice | ChatStats] = Method(
    "chat", ChatRequest, ChatText | ChatNotice | ChatStats, is_stream=True
)


def first_problem(exc: pydantic.ValidationError) -> str:
    """The first thing a validation error found, in one short line (the full error may
    echo a huge value)."""
    error = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "the message"
    return f"{where}: {error['msg']}"
