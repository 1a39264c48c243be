"""Claims against measurements: what speed routing counts for each server."""

from __future__ import annotations

import math

from volunteer.scheduler.claims import (
    DEVICE_PEAK_FLOPS,
    DRAWN_PROBATION_FACTOR,
    PROBATION_FACTOR,
    UNKNOWN_DEVICE_PEAK_FLOPS,
    SpeedEvidence,
    block_flops_per_token,
    plausible_throughput,
    routing_speeds,
)
from volunteer.scheduler.routing import RouteHop, ServerCandidate, inference_route

RTT_S = 0.01
LLAMA_7B_BLOCK = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_heads": 32,
    "num_kv_heads": 32,
    "head_dim": 128,
}


def _route(evidence: list[SpeedEvidence], *, on_probation: bool = True) -> list[RouteHop]:
    speeds = routing_speeds(evidence, on_probation=on_probation)
    candidates = [ServerCandidate(e.peer_id, 0, 30, speeds[e.peer_id], RTT_S) for e in evidence]
    return inference_route(candidates, 0, 30)


def test_an_inflated_claim_from_a_newcomer_does_not_win_over_a_measured_server() -> None:
    honest = SpeedEvidence("honest", claimed=100.0, bound=math.inf, measured=80.0)
    # "a" wins every tie on peer id, so only its speed can keep it out.
    liar = SpeedEvidence("a", claimed=1e6, bound=math.inf)
    assert _route([honest, liar]) == [RouteHop("honest", 0, 30)]
    speeds = routing_speeds([honest, liar])
    assert speeds == {"honest": 80.0, "a": PROBATION_FACTOR * 80.0}
    # Where servers are drawn by speed, it draws at most what the typical one does.
    drawn = routing_speeds([honest, liar], probation_factor=DRAWN_PROBATION_FACTOR)
    assert drawn == {"honest": 80.0, "a": 80.0}


def test_a_newcomer_is_tried_by_its_claim_off_probation() -> None:
    honest = SpeedEvidence("honest", claimed=100.0, bound=math.inf, measured=80.0)
    newcomer = SpeedEvidence("new", claimed=500.0, bound=300.0)
    assert routing_speeds([honest, newcomer], on_probation=False)["new"] == 300.0
    assert _route([honest, newcomer], on_probation=False) == [RouteHop("new", 0, 30)]


def test_a_measured_slow_server_loses_to_a_measured_fast_one_whatever_it_claims() -> None:
    slow = SpeedEvidence("a-slow", claimed=1e9, bound=math.inf, measured=5.0)
    fast = SpeedEvidence("fast", claimed=1.0, bound=math.inf, measured=50.0)
    assert routing_speeds([slow, fast]) == {"a-slow": 5.0, "fast": 50.0}
    assert _route([slow, fast]) == [RouteHop("fast", 0, 30)]
    assert _route([slow, fast], on_probation=False) == [RouteHop("fast", 0, 30)]


def test_with_nobody_measured_no_newcomer_counts_above_the_typical_claim() -> None:
    evidence = [
        SpeedEvidence("h1", claimed=100.0, bound=math.inf),
        SpeedEvidence("h2", claimed=120.0, bound=math.inf),
        SpeedEvidence("liar", claimed=1e9, bound=math.inf),
    ]
    assert routing_speeds(evidence) == {"h1": 100.0, "h2": 120.0, "liar": 120.0}


def test_the_plausible_bound_caps_claims_and_measurements() -> None:
    flops = block_flops_per_token(**LLAMA_7B_BLOCK)
    # q, k, v, o: 4 x 4096^2; gate, up, down: 3 x 4096 x 11008; two FLOPs per weight.
    assert flops == 2 * (4 * 4096**2 + 3 * 4096 * 11008)
    cpu = plausible_throughput(flops, "cpu")
    assert cpu == DEVICE_PEAK_FLOPS["cpu"] / flops
    assert plausible_throughput(flops, "gpu") > cpu
    # Unknown or unstated classes get the loosest bound, never a looser one.
    assert plausible_throughput(flops, None) == UNKNOWN_DEVICE_PEAK_FLOPS / flops
    assert plausible_throughput(flops, "quantum") == plausible_throughput(flops, None)
    assert plausible_throughput(None, "cpu") == math.inf
    liar = SpeedEvidence("liar", claimed=1e9, bound=cpu)
    assert routing_speeds([liar], on_probation=False) == {"liar": cpu}
    glitch = SpeedEvidence("glitch", claimed=1.0, bound=cpu, measured=1e12)
    assert routing_speeds([glitch]) == {"glitch": cpu}


def test_a_server_claiming_nothing_stays_unusable_until_measured() -> None:
    idle = SpeedEvidence("idle", claimed=0.0, bound=math.inf)
    measured = SpeedEvidence("busy", claimed=0.0, bound=math.inf, measured=10.0)
    assert routing_speeds([idle, measured]) == {"idle": 0.0, "busy": 10.0}
    assert routing_speeds([]) == {}


def test_claims_count_in_the_units_measured_then_capped() -> None:
    # Forward calls time many tokens at once: far more tokens/s than the decode speeds
    # records claim. A newcomer's claim is scaled as its measured peers' claims were.
    evidence = [
        SpeedEvidence("m1", claimed=100.0, bound=math.inf, measured=20_000.0),
        SpeedEvidence("m2", claimed=50.0, bound=math.inf, measured=8_000.0),
        SpeedEvidence("slow-new", claimed=10.0, bound=math.inf),
        SpeedEvidence("typical-new", claimed=100.0, bound=math.inf),
    ]
    speeds = routing_speeds(evidence)
    # Low median of 200 and 160 tokens measured per token claimed: 160.
    assert speeds["slow-new"] == 10.0 * 160.0
    # 100 claimed would be 16 000: more than probation allows.
    assert speeds["typical-new"] == PROBATION_FACTOR * 8_000.0
