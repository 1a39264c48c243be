"""Route selection: lowest latency for inference, spread load for forward/backward."""

from __future__ import annotations

import itertools
import random

import pytest
from volunteer.scheduler.routing import (
    Backoff,
    NoRouteError,
    RouteHop,
    ServerCandidate,
    inference_route,
    load_spread_route,
)


def _server(peer: str, start: int, end: int, tps: float = 100.0, rtt: float = 0.01):
    return ServerCandidate(peer, start, end, tps, rtt)


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
