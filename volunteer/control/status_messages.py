"""`status`: one part per service, flat on the wire (`volunteer.control.messages` names
the method)."""

from __future__ import annotations

from typing import Any, Literal

from volunteer.control.reply import Reply

PAUSED_NOTE = "paused by you: not taking new sessions"

DaemonState = Literal[
    "not_running", "starting", "joining", "serving", "paused", "rebalancing", "stopping",
    "failed",
]  # fmt: skip
"""`starting` and `not_running` are the CLI's words for a daemon that does not answer
yet (its pid file exists) or at all; the daemon itself says the others."""


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
    steps_batched: int = 0
    """Inference steps that ran in a batch with other sessions' steps."""
    largest_batch: int = 0
    """The most sessions' steps one batch held."""
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
    pause_reason: str | None = None
    """Who paused it: "you", or the owner's rule that did (`volunteer.daemon.rule_watch`)."""
    owner_rules: str | None = None
    """What the owner's rules say at their last look, with where user activity came from."""
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


class ApiStatus(Reply):
    """The OpenAI API's part of `status`."""

    api_url: str | None = None
    """Its base URL; None: not served (`--api`)."""
    api_requests: int = 0
    """Generations it has started."""
    api_active: int = 0


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


class TrainingStatus(Reply):
    """The training role's part (`train_status` answers with it alone)."""

    training_role: Literal["driver", "peer", "standby"] | None = None
    """Driving a job (this daemon created it, or drives it on as a backup), a stage
    peer of one, or a backup standing by to drive one on; None: not training."""
    training_state: Literal["waiting", "running", "done", "failed", "left"] | None = None
    training_job: str | None = None
    training_creator: str | None = None
    training_stage: int | None = None
    training_blocks: tuple[int, int] | None = None
    training_step: int = 0
    training_steps: int = 0
    training_loss: float | None = None
    training_losses: list[tuple[int, float]] = []
    """(step, loss), the latest at most 512 (the driver's)."""
    training_stage_peers: list[int] = []
    """Peers per stage, as the DHT lists them."""
    training_banned: list[str] = []
    training_samples_per_s: float | None = None
    training_error: str | None = None
    training_result: str | None = None
    """Where the finished job's result was saved (the driver's: an adapter's name)."""


class StatusReply(
    ServingStatus,
    DHTStatus,
    ChatStatus,
    ApiStatus,
    TrustStatus,
    CreditStatus,
    TrainingStatus,
    DaemonStatus,
):
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
            reason = status.pause_reason
            note = PAUSED_NOTE if reason in (None, "you") else f"paused: {reason}"
            return status.model_copy(update={"state": "paused", "error": note})
        if status.rebalancing:
            return status.model_copy(update={"state": "rebalancing"})
        return status
