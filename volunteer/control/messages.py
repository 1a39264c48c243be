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

from volunteer.control.reply import Params as Params
from volunteer.control.reply import Reply as Reply
from volunteer.control.status_messages import PAUSED_NOTE as PAUSED_NOTE
from volunteer.control.status_messages import ApiStatus as ApiStatus
from volunteer.control.status_messages import ChatStatus as ChatStatus
from volunteer.control.status_messages import CreditStatus as CreditStatus
from volunteer.control.status_messages import DaemonState as DaemonState
from volunteer.control.status_messages import DaemonStatus as DaemonStatus
from volunteer.control.status_messages import DHTStatus as DHTStatus
from volunteer.control.status_messages import ServingStatus as ServingStatus
from volunteer.control.status_messages import StatusReply as StatusReply
from volunteer.control.status_messages import TrainingStatus as TrainingStatus
from volunteer.control.status_messages import TrustStatus as TrustStatus

MAX_MESSAGES = 1000
MAX_NEW_TOKENS = 32768
MAX_SERIES_POINTS = 512  # a fine-tuning job's series are thinned to at most this many

FinetuneState = Literal["idle", "running", "stopping", "done", "stopped", "failed"]
AdapterName = Annotated[str, pydantic.Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
"""As `volunteer.finetune.adapter_info.valid_name` allows (no name climbs out of the store)."""
Series = Annotated[list[tuple[int, float]], pydantic.Field(max_length=2 * MAX_SERIES_POINTS)]


class NoParams(Params):
    """For the methods that take nothing."""


class SwarmParams(Params):
    is_ping: bool = pydantic.Field(default=False, alias="ping")
    """Also measure each serving peer's round trip from the daemon."""

    model_config = pydantic.ConfigDict(populate_by_name=True)


StopText = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=256)]
"""A text that ends a reply (OpenAI's `stop`)."""
MAX_STOPS = 4


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
    raw: bool = False
    """Continue the last message's text as it is, with no chat template (a completion)."""
    stop: Annotated[list[StopText], pydantic.Field(max_length=MAX_STOPS)] = []
    """The reply ends once its text holds one of these (the text keeps it: callers cut)."""


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


class TrainCreateRequest(Params):
    """`train_create`: a collaborative training job this daemon announces and drives,
    as `volunteer train create`'s flags (unknown fields are refused)."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    data: str = pydantic.Field(min_length=1, max_length=4096)
    """Token ids (.npy) or text, as an absolute path on the daemon's machine."""
    stages: int = pydantic.Field(default=2, ge=1, le=64)
    steps: int = pydantic.Field(default=100, ge=1, le=10**9)
    batch_size: int = pydantic.Field(default=8, ge=1, le=65_536)
    microbatch_size: int = pydantic.Field(default=2, ge=1, le=65_536)
    sequence_length: int = pydantic.Field(default=64, ge=2, le=65_536)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = pydantic.Field(default=1e-4, gt=0, le=10)
    aggregation: Literal["mean", "centered-clip"] = "centered-clip"
    tau: float = pydantic.Field(default=1.0, gt=0, le=1e6)
    checks: int = pydantic.Field(default=1, ge=0, le=64)
    """Stage peers whose share validators recompute per stage and step."""
    rebalance: bool = True
    """Move peers from fast stages to slow ones (SWARM's rebalancing)."""
    lora_rank: int | None = pydantic.Field(default=None, ge=1, le=256)
    """Train LoRA adapters of this rank (a large model); None: the blocks themselves."""
    min_peers: int = pydantic.Field(default=1, ge=1, le=64)
    """Peers each stage must have before the first step."""
    save_as: str | None = pydantic.Field(default=None, min_length=1, max_length=64)
    """The name the result is saved under when the job is done: a LoRA job's adapter,
    or a model folder for a job of the blocks (default: train-<job id>)."""
    seed: int = pydantic.Field(default=0, ge=0, le=2**63 - 1)
    shards: int = pydantic.Field(default=0, ge=0, le=16)
    """Shards the data is cut into, each named by its sha256 in the job (0: by size)."""
    backups: list[str] = pydantic.Field(default=[], max_length=7)
    """Peer ids of daemons that may drive the job on, in this order, if this one is gone
    for good (each stands by with `volunteer train standby DATA`)."""


class TrainStandbyParams(Params):
    """`train_standby`: stand by to drive on a job that names this daemon a backup."""

    model_config = pydantic.ConfigDict(extra="forbid")

    data: str | None = pydantic.Field(default=None, min_length=1, max_length=4096)
    """The job's data on this machine (an absolute path; its shards must hash to the
    job's); None: each shard is fetched from the driving daemon and checked."""
    creator: str | None = pydantic.Field(default=None, max_length=128)
    """The job's creator (peer id); None: the job naming this daemon (if one)."""


class TrainJoinParams(Params):
    model_config = pydantic.ConfigDict(extra="forbid")

    creator: str | None = pydantic.Field(default=None, max_length=128)
    """The job's creator (peer id); None: the job of the daemon's model (if one)."""
    stage: int | None = pydantic.Field(default=None, ge=0, le=63)
    """None: the stage with the fewest peers."""


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
    prompt_tokens: int = 0
    finish: Literal["stop", "length"] = "stop"
    """"length": it ended at the most tokens it could have (asked for, or the context's)."""


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
TRAIN_CREATE = Method("train_create", TrainCreateRequest, TrainingStatus)
TRAIN_JOIN = Method("train_join", TrainJoinParams, TrainingStatus)
TRAIN_STANDBY = Method("train_standby", TrainStandbyParams, TrainingStatus)
TRAIN_LEAVE = Method("train_leave", NoParams, TrainingStatus)
TRAIN_STATUS = Method("train_status", NoParams, TrainingStatus)
CHAT: Method[ChatRequest, ChatText | ChatNotice | ChatStats] = Method(
    "chat", ChatRequest, ChatText | ChatNotice | ChatStats, is_stream=True
)


def first_problem(exc: pydantic.ValidationError) -> str:
    """The first thing a validation error found, in one short line (the full error may
    echo a huge value)."""
    error = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "the message"
    return f"{where}: {error['msg']}"
