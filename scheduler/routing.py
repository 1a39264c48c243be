"""Choosing which servers a client's request goes through.

Plain data in, a route out: no clock, no network, no global randomness. Inference takes
the route with the smallest estimated latency per token (round trips plus compute time
over the blocks each server runs); forward/backward spread load by drawing servers at
random, weighted by throughput, from an rng the caller passes in. Both prefer servers of
better standing (`scheduler.verification.standing`) among those of like speed: a server
counts as slower the worse its standing beside the best among the candidates, by
`standing_factor`, at most `1 + STANDING_WEIGHT` times (equal standings: not at all).
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from collections.abc import Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class ServerCandidate:
    """A server that holds blocks [start, end), as the client sees it."""

    peer_id: str
    start: int
    end: int
    throughput: float
    """Tokens per second per block this server announced (> 0 to be usable)."""
    rtt_s: float | None = None
    """Measured round trip to it; None when not measured yet."""
    standing: float = 0.5
    """0 to 1, what the client's own checks of it found (`scheduler.verification.standing`):
    the default is a newcomer's, so candidates that leave it out are all on a par."""


@dataclasses.dataclass(frozen=True)
class RouteHop:
    """Blocks [start, end) run on one server."""

    peer_id: str
    start: int
    end: int


class NoRouteError(Exception):
    """No combination of usable servers covers the requested blocks.

    Attributes:
        gap: the first blocks `(start, end)` that no usable server holds.
    """

    def __init__(self, gap: tuple[int, int]) -> None:
        super().__init__(f"no usable server holds blocks {gap[0]}:{gap[1]}")
        self.gap = gap


def first_gap(servers: Sequence[ServerCandidate], start: int, end: int) -> tuple[int, int]:
    """The first run of blocks in [start, end) that none of `servers` holds
    (`(end, end)` when they hold every block)."""
    held = [False] * (end - start)
    for server in servers:
        for index in range(max(server.start, start), min(server.end, end)):
            held[index - start] = True
    first = next((i for i, is_held in enumerate(held) if not is_held), len(held))
    last = next((i for i in range(first, len(held)) if held[i]), len(held))
    return start + first, start + last


DEFAULT_RTT_S = 0.05
"""Assumed round trip for servers not measured yet: a typical internet hop."""
HOP_OVERHEAD_S = 0.001
"""Fixed cost of any hop, even in-process (hand-off, (de)serialising, a cache look-up).

Without it a server with a zero round trip (our own) would cost the same split into
many hops as in one, and float rounding would pick a fragmented route."""
STANDING_WEIGHT = 1.0
"""How much a poor standing slows a server down in routing's eyes (`standing_factor`).

A server's compute time counts `1 + STANDING_WEIGHT * (1 - standing)` times over,
relative to the best standing among the candidates, and its draw weight is divided by as
much: beside a long clean record (standing about 0.9), a newcomer (0.5) counts about 1.4
times over; 2 times at worst (standing 0 beside 1). Bounded, so that speed still decides
between servers far apart (a newcomer over twice as fast as the best-standing server
wins the route, and gets the checks that build its record), while standing decides
between servers of like speed. Relative, so that equal standings (all newcomers, the
default) route exactly as by speed alone. The round trip is not scaled: it is measured,
whoever the server is."""


def standing_factor(standing: float, best: float = 1.0) -> float:
    """How many times over the compute time of a server of `standing` counts beside one
    of the `best` standing among the candidates: 1 at `best`, up to `1 + STANDING_WEIGHT`
    (standings are clamped to 0..1, and `standing` to at most `best`)."""
    best = min(1.0, max(0.0, best))
    standing = min(best, max(0.0, standing))
    return (1.0 + STANDING_WEIGHT * (1.0 - standing)) / (1.0 + STANDING_WEIGHT * (1.0 - best))


def _best_standing(servers: Sequence[ServerCandidate]) -> float:
    return max((c.standing for c in servers), default=1.0)


def inference_route(
    candidates: Iterable[ServerCandidate],
    start: int,
    end: int,
    *,
    avoid: frozenset[str] = frozenset(),
) -> list[RouteHop]:
    """The chain of servers covering [start, end) with the lowest estimated latency.

    Each hop costs its round trip, plus `HOP_OVERHEAD_S`, plus `blocks / throughput`
    times the server's `standing_factor` beside the best standing among the usable
    servers; a server may be used for any part of its span.
    Ties go to fewer hops, then to smaller peer ids, so one input gives one route.

    Raises:
        NoRouteError: the usable servers leave a gap in [start, end).
    """
    usable = sorted(
        (c for c in candidates if c.peer_id not in avoid and c.throughput > 0),
        key=lambda c: (c.peer_id, c.start, c.end),
    )
    best_standing = _best_standing(usable)
    # Dijkstra over block positions: an edge i -> j through server c when c holds [i, j).
    best: dict[int, tuple[float, int, str]] = {start: (0.0, 0, "")}
    previous: dict[int, tuple[int, ServerCandidate]] = {}
    queue: list[tuple[float, int, str, int]] = [(0.0, 0, "", start)]
    while queue:
        cost, hops, tie, position = heapq.heappop(queue)
        if position == end:
            break
        if (cost, hops, tie) > best.get(position, (float("inf"), 0, "")):
            continue
        for server in usable:
            if not server.start <= position < server.end:
                continue
            rtt = DEFAULT_RTT_S if server.rtt_s is None else server.rtt_s
            slowness = standing_factor(server.standing, best_standing)
            for stop in range(position + 1, min(server.end, end) + 1):
                compute_s = (stop - position) / server.throughput * slowness
                hop_s = rtt + HOP_OVERHEAD_S + compute_s
                key = (cost + hop_s, hops + 1, server.peer_id)
                if key < best.get(stop, (float("inf"), 0, "")):
                    best[stop] = key
                    previous[stop] = (position, server)
                    heapq.heappush(queue, (*key, stop))
    if end not in previous and start != end:
        raise NoRouteError(first_gap(usable, start, end))
    return _walk_back(previous, start, end)


def _walk_back(
    previous: dict[int, tuple[int, ServerCandidate]], start: int, end: int
) -> list[RouteHop]:
    route = []
    position = end
    while position != start:
        before, server = previous[position]
        route.append(RouteHop(server.peer_id, before, position))
        position = before
    return route[::-1]


def load_spread_route(
    candidates: Sequence[ServerCandidate],
    start: int,
    end: int,
    *,
    rng: random.Random,
    avoid: frozenset[str] = frozenset(),
) -> list[RouteHop]:
    """A route for forward/backward: at each position, a server drawn by throughput
    divided by its `standing_factor` beside the best standing among the usable servers
    (so by throughput alone among equal standings).

    Raises:
        NoRouteError: the usable servers leave a gap in [start, end).
    """
    usable = sorted(
        (c for c in candidates if c.peer_id not in avoid and c.throughput > 0),
        key=lambda c: (c.peer_id, c.start, c.end),
    )
    best_standing = _best_standing(usable)
    route = []
    position = start
    while position < end:
        here = [c for c in usable if c.start <= position < c.end]
        if not here:
            raise NoRouteError(first_gap(usable, position, end))
        weights = [c.throughput / standing_factor(c.standing, best_standing) for c in here]
        server = rng.choices(here, weights=weights)[0]
        stop = min(server.end, end)
        route.append(RouteHop(server.peer_id, position, stop))
        position = stop
    return route


@dataclasses.dataclass
class Backoff:
    """Failed peers are avoided for base_s * 2^(failures - 1), capped at max_s.

    Time comes in as an argument (`now_s`), so the decision stays deterministic.
    """

    base_s: float = 1.0
    max_s: float = 300.0
    _failures: dict[str, int] = dataclasses.field(default_factory=dict)
    _until_s: dict[str, float] = dataclasses.field(default_factory=dict)

    def record_failure(self, peer_id: str, now_s: float) -> None:
        count = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = count
        self._until_s[peer_id] = now_s + min(self.max_s, self.base_s * 2 ** (count - 1))

    def record_success(self, peer_id: str) -> None:
        self._failures.pop(peer_id, None)
        self._until_s.pop(peer_id, None)

    def avoided(self, now_s: float) -> frozenset[str]:
        """Peers still inside their back-off window at `now_s`."""
        return frozenset(peer for peer, until in self._until_s.items() if until > now_s)
