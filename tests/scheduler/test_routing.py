"""Route selection: lowest latency for inference, spread load for forward/backward."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
from volunteer.scheduler.routing import (
    STANDING_WEIGHT,
    Backoff,
    NoRouteError,
    RouteHop,
    ServerCandidate,
    inference_route,
    load_spread_route,
    standing_factor,
)


def _server(
    peer: str,
    start: int,
    end: int,
    tps: float = 100.0,
    rtt: float = 0.01,
    standing: float = 0.5,
):
    return ServerCandidate(peer, start, end, tps, rtt, standing)


def test_one_server_for_everything_beats_two_hops() -> None:
    servers = [_server("a", 0, 30), _server("b", 0, 15), _server("c", 15, 30)]
    assert inference_route(servers, 0, 30) == [RouteHop("a", 0, 30)]


def test_a_server_with_no_round_trip_is_one_hop_not_many() -> None:
    # Our own server (rtt 0) with a throughput whose per-block times do not add up
    # exactly in floating point: the route must still be one hop, not a split of it.
    for tps in (1386.5, 97.3, 1e6 / 3):
        servers = [_server("own", 0, 30, tps=tps, rtt=0.0)]
        assert inference_route(servers, 0, 30) == [RouteHop("own", 0, 30)]


def test_chains_partial_spans_when_needed() -> None:
    servers = [_server("b", 0, 15), _server("c", 10, 30)]
    route = inference_route(servers, 0, 30)
    assert route[0].start == 0 and route[-1].end == 30
    assert all(a.end == b.start for a, b in itertools.pairwise(route))
    assert [hop.peer_id for hop in route] == ["b", "c"]


def test_prefers_the_faster_and_nearer_server() -> None:
    slow = _server("slow", 0, 30, tps=10.0)
    fast = _server("fast", 0, 30, tps=1000.0)
    assert inference_route([slow, fast], 0, 30) == [RouteHop("fast", 0, 30)]
    far = _server("far", 0, 30, rtt=1.0)
    near = _server("near", 0, 30, rtt=0.001)
    assert inference_route([far, near], 0, 30) == [RouteHop("near", 0, 30)]


def test_avoided_and_dead_servers_are_skipped_and_gaps_raise() -> None:
    servers = [_server("a", 0, 30), _server("b", 0, 30, tps=50.0), _server("z", 0, 30, tps=0)]
    assert inference_route(servers, 0, 30, avoid=frozenset({"a"})) == [RouteHop("b", 0, 30)]
    with pytest.raises(NoRouteError, match="0:30"):
        inference_route(servers, 0, 30, avoid=frozenset({"a", "b"}))
    with pytest.raises(NoRouteError):
        inference_route([_server("a", 0, 10), _server("b", 11, 30)], 0, 30)


def test_sub_span_routes_for_failover() -> None:
    servers = [_server("a", 0, 30), _server("b", 10, 20)]
    assert inference_route(servers, 12, 18, avoid=frozenset({"a"})) == [RouteHop("b", 12, 18)]


def test_same_input_same_route_whatever_the_order() -> None:
    servers = [_server(p, 0, 30) for p in "dcba"]
    assert inference_route(servers, 0, 30) == inference_route(servers[::-1], 0, 30)
    assert inference_route(servers, 0, 30)[0].peer_id == "a"


def test_load_spread_draws_by_throughput_and_covers_the_span() -> None:
    servers = [_server("a", 0, 30, tps=300.0), _server("b", 0, 30, tps=100.0)]
    counts = {"a": 0, "b": 0}
    rng = random.Random(0)
    for _ in range(2000):
        (hop,) = load_spread_route(servers, 0, 30, rng=rng)
        counts[hop.peer_id] += 1
    assert 0.70 < counts["a"] / 2000 < 0.80
    route = load_spread_route([_server("x", 0, 12), _server("y", 12, 30)], 0, 30, rng=rng)
    assert route == [RouteHop("x", 0, 12), RouteHop("y", 12, 30)]


def test_of_like_speed_the_reputable_server_is_chosen() -> None:
    # "a" would win the tie by peer id: standing alone must move the route to "b".
    newcomer = _server("a", 0, 30, standing=0.5)
    reputable = _server("b", 0, 30, standing=0.9)
    assert inference_route([newcomer, reputable], 0, 30) == [RouteHop("b", 0, 30)]
    # Still when the reputable one is a little slower, and for a part of the chain.
    slightly_slower = _server("b", 0, 30, tps=90.0, standing=0.9)
    assert inference_route([newcomer, slightly_slower], 0, 30) == [RouteHop("b", 0, 30)]
    chain = [_server("a", 0, 30), _server("c", 15, 30, standing=0.95)]
    assert inference_route(chain, 0, 30) == [RouteHop("a", 0, 15), RouteHop("c", 15, 30)]


def test_the_standing_penalty_is_bounded_so_a_much_faster_newcomer_wins() -> None:
    assert standing_factor(0.0, 1.0) == pytest.approx(1.0 + STANDING_WEIGHT)
    assert standing_factor(-5.0, 7.0) == pytest.approx(1.0 + STANDING_WEIGHT)
    assert standing_factor(0.7, 0.7) == 1.0 and standing_factor(0.9, 0.5) == 1.0
    # Three times as fast: the newcomer wins, even with the worst standing there is.
    slow_veteran = _server("old", 0, 30, tps=100.0, standing=1.0)
    for level in (0.5, 0.0):
        fast_newcomer = _server("new", 0, 30, tps=300.0, standing=level)
        route = inference_route([slow_veteran, fast_newcomer], 0, 30)
        assert route == [RouteHop("new", 0, 30)]


def test_equal_standings_route_as_by_speed_alone() -> None:
    # Round trip against compute: "b" wins by speed alone (0.511 s against 0.601 s), but
    # would lose were every compute time scaled by the same factor (1.5: 0.761 against 0.751).
    servers = [_server("a", 0, 30, tps=100.0, rtt=0.3), _server("b", 0, 30, tps=60.0, rtt=0.01)]
    by_speed = inference_route(servers, 0, 30)
    assert by_speed == [RouteHop("b", 0, 30)]
    for level in (0.0, 0.3, 0.9, 1.0):
        same = [dataclasses.replace(c, standing=level) for c in servers]
        assert inference_route(same, 0, 30) == by_speed
    drawn = [
        _server("a", 0, 30, tps=300.0, standing=0.2),
        _server("b", 0, 30, tps=100.0, standing=0.2),
    ]
    rng = random.Random(0)
    share = sum(load_spread_route(drawn, 0, 30, rng=rng)[0].peer_id == "a" for _ in range(2000))
    assert 0.70 < share / 2000 < 0.80


def test_spread_draws_favour_the_reputable_server() -> None:
    servers = [_server("new", 0, 30, standing=0.5), _server("old", 0, 30, standing=1.0)]
    rng = random.Random(1)
    draws = 4000
    old = sum(load_spread_route(servers, 0, 30, rng=rng)[0].peer_id == "old" for _ in range(draws))
    # Weights 1 and 1 / 1.5: "old" draws 60%, a newcomer still 40% (so it gets checked).
    expected = standing_factor(0.5) / (1.0 + standing_factor(0.5))
    assert expected - 0.03 < old / draws < expected + 0.03
    assert 0.55 < old / draws < 0.65


def test_backoff_doubles_and_forgives() -> None:
    backoff = Backoff(base_s=1.0, max_s=5.0)
    backoff.record_failure("a", now_s=0.0)
    assert backoff.avoided(0.5) == {"a"} and backoff.avoided(1.5) == frozenset()
    backoff.record_failure("a", now_s=10.0)
    assert backoff.avoided(11.5) == {"a"} and backoff.avoided(12.5) == frozenset()
    for now in (20.0, 21.0, 22.0, 23.0):
        backoff.record_failure("a", now_s=now)
    assert backoff.avoided(23.0 + 4.9) == {"a"} and backoff.avoided(23.0 + 5.1) == frozenset()
    backoff.record_success("a")
    assert backoff.avoided(23.0) == frozenset()
