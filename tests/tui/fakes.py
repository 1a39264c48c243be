"""A scripted daemon for rendering and key-binding tests (the real one is used in
tests/tui/test_app_daemon.py), and fixed gauges so screens are deterministic."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from volunteer.tui.client import config_as_text
from volunteer.tui.gauges import Gauges

from volunteer.control.messages import (
    PAUSED_NOTE,
    ChatStats,
    ChatText,
    LeaderboardReply,
    PeersReply,
    RouteHop,
    StatusReply,
    SwarmReply,
)
from volunteer.paths import Paths
from volunteer.settings import read_config, save_config

GIB = 2**30

SERVING = StatusReply.model_validate(
    {
        "state": "serving",
        "error": None,
        "model": "smollm2-135m-instruct",
        "swarm_model": "smollm2-135m-instruct",
        "blocks": [0, 15],
        "span_reason": "blocks 0:15 because they are the swarm's weakest span",
        "peers_seen": 2,
        "requests_served": 1200,
        "tokens_served": 3400,
        "open_sessions": 1,
        "chats_answered": 3,
        "uptime_s": 754.0,
    }
)

SWARM_DATA = {
    "model": "smollm2-135m-instruct",
    "num_blocks": 30,
    "block_throughput": [40.0] * 15 + [10.0] * 15,
    "servers": [
        {"peer_id": "QmAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA1", "start": 0, "end": 15,
         "throughput": 40.0, "state": "online", "public_name": "alice", "version": "0.1.0",
         "rtt_s": 0.0021},
        {"peer_id": "QmBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB2", "start": 15, "end": 30,
         "throughput": 10.0, "state": "online", "public_name": None, "version": "0.1.0",
         "rtt_s": None},
    ],
}  # fmt: skip
SWARM = SwarmReply.model_validate(SWARM_DATA)
PEERS = PeersReply.model_validate(
    {
        "peers": [
            {"peer_id": "QmAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA1", "standing": 0.83,
             "passed": 40, "failed": 0},
            {"peer_id": "QmBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB2", "standing": 0.1,
             "passed": 2, "failed": 1, "banned_until_s": 4102444800.0,
             "ban_reason": "wrong output on blocks 15:30 at position 7"},
        ]
    }
)  # fmt: skip

BOARD = LeaderboardReply.model_validate(
    {
        "rows": [
            {"rank": 1, "peer_id": "QmAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA1",
             "public_name": "alice", "recent_average": 12.5, "total": 340.25,
             "blocks": [0, 15], "uptime_share": 0.97, "reputation": 0.83},
            {"rank": 2, "peer_id": "QmSELFSELFSELFSELFSELFSELFSELFSELFSELF3",
             "public_name": "ada", "recent_average": 4.0, "total": 20.5, "blocks": [15, 30],
             "uptime_share": 0.5, "reputation": 0.5, "is_self": True},
            {"rank": 3, "peer_id": "QmCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC4",
             "public_name": None, "recent_average": 3.0, "total": 3.0, "held": 3.0,
             "blocks": [0, 30], "uptime_share": 0.1, "reputation": 0.5},
            {"rank": 4, "peer_id": "QmBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB2",
             "public_name": "[bold red]mallory[/]", "recent_average": 1.0, "total": 9.0,
             "held": 9.0, "forfeited": True, "uptime_share": 0.3, "reputation": 0.1},
        ],
        "own_peer_id": "QmSELFSELFSELFSELFSELFSELFSELFSELFSELF3",
        "history": [0.0, 0.0, 1.5, 3.0, 2.0, 6.0, 8.0],
    }
)  # fmt: skip

FIXED_GAUGES = Gauges(
    cpu_percent=42.0,
    ram_used_bytes=6 * GIB,
    ram_total_bytes=16 * GIB,
    disk_free_bytes=100 * GIB,
    disk_total_bytes=400 * GIB,
    gpus=(),
    gpu_note="NVML not available: NVML Shared Library Not Found",
)

ANSWER = ["The capital ", "of France ", "is **Paris**."]
STATS = ChatStats(
    tokens=8,
    seconds=0.5,
    route=[
        RouteHop(peer_id=SWARM.servers[0].peer_id, start=0, end=15),
        RouteHop(peer_id=SWARM.servers[1].peer_id, start=15, end=30),
    ],
)


class FakeDaemon:
    """Answers like the daemon's control API, from a script; records what it was asked."""

    def __init__(
        self, *, running: bool = True, log_file: Path | None = None, paths: Paths | None = None
    ) -> None:
        self.running = running
        self.log_file = log_file
        self.paths = paths
        """Where the settings screen's config.toml lives (the real file logic runs)."""
        self.restarted = 0
        self.status_reply = SERVING
        self.swarm_reply = SWARM
        self.peers_reply = PEERS
        self.board_reply: LeaderboardReply | Exception = BOARD
        """The leaderboard; an exception to raise instead (a daemon that fails)."""
        self.answer = list(ANSWER)
        self.chat_requests: list[dict[str, Any]] = []
        self.started = self.stopped = 0
        self.hold_after_first_piece: threading.Event | None = None
        """When set to an Event, the chat waits on it after its first piece."""
        self.chat_closed = threading.Event()
        self.holding = threading.Event()
        """Set once the chat holds after its first piece (the app has taken that piece)."""

    def status(self) -> StatusReply | None:
        return self.status_reply if self.running else None

    def swarm(self) -> SwarmReply:
        return self.swarm_reply

    def peers(self) -> PeersReply:
        return self.peers_reply

    def leaderboard(self) -> LeaderboardReply:
        if isinstance(self.board_reply, Exception):
            raise self.board_reply
        return self.board_reply

    def chat(self, params: dict[str, Any]) -> Iterator[ChatText | ChatStats]:
        self.chat_requests.append(params)
        try:
            for index, piece in enumerate(self.answer):
                yield ChatText(text=piece)
                if index == 0 and self.hold_after_first_piece is not None:
                    self.holding.set()
                    self.hold_after_first_piece.wait(10)
            yield STATS
        finally:
            self.chat_closed.set()

    def start(self) -> str:
        self.started += 1
        self.running = True
        return "volunteer: serving blocks 0:15"

    def stop(self) -> str:
        self.stopped += 1
        self.running = False
        return "daemon stopped"

    def set_paused(self, is_paused: bool) -> str:
        self.status_reply = self.status_reply.model_copy(
            update={
                "state": "paused" if is_paused else "serving",
                "error": PAUSED_NOTE if is_paused else None,
            }
        )
        return "paused" if is_paused else "resumed serving"

    def restart(self) -> str:
        self.restarted += 1
        self.running = True
        return "daemon stopped; volunteer: serving blocks 0:15"

    def read_config(self) -> dict[str, str]:
        assert self.paths is not None, "this test gave the fake no config"
        return config_as_text(read_config(self.paths))

    def save_config(self, edits: dict[str, str]) -> str:
        assert self.paths is not None, "this test gave the fake no config"
        save_config(self.paths, edits)
        return "saved to config.toml; applied on restart (ctrl+r)"
