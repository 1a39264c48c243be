"""Peers kept out for a while after failing too often, each time for longer.

A server drops a push that does not authenticate (`volunteer.server.push`), but dropping
still costs it a stream to accept and a message to parse: a peer that keeps guessing
could keep the event loop busy for nothing. So each failure is a strike; a peer with
more than `free_strikes` recent strikes is refused new streams of that kind for
`first_ban_s`, twice as long at its next ban, and so on up to `max_ban_s`. Strikes fade
(halving every `strike_half_life_s`), so an honest server whose push now and then misses
a session that just closed is never kept out.

Memory is bounded: at most `max_peers` peers are remembered; past it the ones not kept
out now, and then those whose ban ends soonest, are forgotten (a forgotten peer starts
afresh: many identities buy an attacker a few strikes each, no more).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

FREE_STRIKES = 3
FIRST_BAN_S = 10.0
MAX_BAN_S = 3600.0
STRIKE_HALF_LIFE_S = 60.0
MAX_PEERS = 4096


@dataclasses.dataclass
class _Record:
    strikes: float = 0.0
    at: float = 0.0
    """When (the box's clock) `strikes` was last brought up to date."""
    bans: int = 0
    """Bans so far: the next lasts first_ban_s * 2 ** bans."""
    until: float = 0.0
    """Kept out until then (the box's clock)."""


class PenaltyBox:
    """Strikes and bans per peer. Used from the event loop only."""

    def __init__(
        self,
        *,
        free_strikes: int = FREE_STRIKES,
        first_ban_s: float = FIRST_BAN_S,
        max_ban_s: float = MAX_BAN_S,
        strike_half_life_s: float = STRIKE_HALF_LIFE_S,
        max_peers: int = MAX_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free_strikes = free_strikes
        self.first_ban_s = first_ban_s
        self.max_ban_s = max_ban_s
        self.strike_half_life_s = strike_half_life_s
        self.max_peers = max_peers
        self.clock = clock
        self._records: dict[str, _Record] = {}

    def __len__(self) -> int:
        return len(self._records)

    def banned_for(self, peer: str) -> float:
        """Seconds the peer is still kept out (0: it is not)."""
        record = self._records.get(peer)
        if record is None:
            return 0.0
        return max(record.until - self.clock(), 0.0)

    def strike(self, peer: str) -> float:
        """Counts a failure of `peer`; returns the ban it earned now (0: none)."""
        now = self.clock()
        record = self._records.get(peer)
        if record is None:
            self._make_room(now)
            record = self._records[peer] = _Record(at=now)
        fade = 0.5 ** (max(now - record.at, 0.0) / self.strike_half_life_s)
        record.strikes = record.strikes * fade + 1.0
        record.at = now
        if record.strikes <= self.free_strikes or record.until > now:
            return 0.0
        ban_s = min(self.first_ban_s * 2.0**record.bans, self.max_ban_s)
        record.bans += 1
        record.until = now + ban_s
        record.strikes = 0.0
        return ban_s

    def _make_room(self, now: float) -> None:
        if len(self._records) < self.max_peers:
            return
        # Down to three quarters at once, so that a stream of new peers sorts rarely.
        keep = self.max_peers * 3 // 4
        ranked = sorted(
            self._records.items(), key=lambda item: (item[1].until > now, item[1].until)
        )
        for peer, _ in ranked[: len(ranked) - keep]:
            del self._records[peer]
