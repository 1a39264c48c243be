"""Scheduler decision times and the 10,000-volunteer churn simulation.

- block selection in a 10,000-server swarm of an 80-block model: summing the servers'
  throughput per block and choosing the weakest window (target < 50 ms);
- the offloading policy's linear program: one solve (target < 100 ms) and the whole
  search over batch sizes and compression, for OPT-30B on FlexGen's T4 machine;
- the "should I move?" decision in that swarm, the others' reaction simulated;
- the churn simulation: 10,000 volunteers join, 30% leave, the rest rebalance; the
  weakest block relative to the ideal after each phase (target >= 0.8 after rebalancing).

Prints a table, then one JSON line with every figure, including `select_ms`, `lp_ms`
and `coverage_after_rebalance`.

    python bench/scheduler_decisions.py [--volunteers 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

# The script's folder is first on sys.path when run as `python bench/scheduler_decisions.py`.
from flexgen_reference import OPT_30B, OPT_30B_TOKENS_S, T4_MACHINE, WORKLOAD
from volunteer.scheduler.block_selection import block_throughputs, choose_best_start
from volunteer.scheduler.offload import search_policy, solve_placement
from volunteer.scheduler.offload_cost import Batching
from volunteer.scheduler.rebalancing import should_move
from volunteer.scheduler.simulate import ModelShape, draw_volunteers, join_all, simulate

T4 = T4_MACHINE  # FlexGen's machine, as in tests/scheduler/test_offload.py
LOAD = WORKLOAD


def _median_ms(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        action()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volunteers", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    figures: dict[str, Any] = {"volunteers": args.volunteers}

    model = ModelShape()
    rng = random.Random(0)
    spans = join_all(draw_volunteers(args.volunteers, rng), model, rng)
    figures["servers"] = len(spans)

    def select() -> int:
        return choose_best_start(block_throughputs(spans, model.total_blocks), 8, rng)

    figures["select_ms"] = round(_median_ms(select, args.repeats), 2)

    batching = Batching(gpu_batch_size=64, num_gpu_batches=2)
    figures["lp_ms"] = round(
        _median_ms(lambda: solve_placement(OPT_30B, LOAD, T4, batching), args.repeats * 4), 2
    )
    figures["policy_search_ms"] = round(
        _median_ms(lambda: search_policy(OPT_30B, LOAD, T4), args.repeats), 1
    )
    policy = search_policy(OPT_30B, LOAD, T4, allow_compression=False)
    figures["opt30b_t4_tokens_s"] = round(policy.tokens_s, 2)
    figures["opt30b_t4_flexgen_ratio"] = round(policy.tokens_s / OPT_30B_TOKENS_S, 3)

    mover = spans[len(spans) // 2].peer_id
    began = time.perf_counter()
    decision = should_move(spans, mover, model.total_blocks, random.Random(1))
    figures["should_move_ms"] = round((time.perf_counter() - began) * 1000, 1)

    began = time.perf_counter()
    result = simulate(args.volunteers, seed=0, model=model)
    figures["simulation_s"] = round(time.perf_counter() - began, 2)
    figures.update(
        {
            k: round(v, 4) if isinstance(v, float) else v
            for k, v in dataclasses.asdict(result).items()
        }
    )

    print(f"block selection, {len(spans)} servers:   {figures['select_ms']:8.2f} ms")
    print(f"one LP solve (OPT-30B, T4):        {figures['lp_ms']:8.2f} ms")
    print(f"whole policy search:               {figures['policy_search_ms']:8.1f} ms")
    print(f"  {policy.describe()} (FlexGen measured 7.32 tokens/s)")
    print(
        f"should-I-move, others simulated:   {figures['should_move_ms']:8.1f} ms  "
        f"({decision.reason})"
    )
    print(
        f"churn simulation, {args.volunteers} volunteers ({result.servers} serving, "
        f"{result.left} leave): coverage {result.coverage_after_join:.3f} after joining, "
        f"{result.coverage_after_churn:.3f} after churn, {result.coverage_after_rebalance:.3f} "
        f"after rebalancing ({result.moves} moves), {figures['simulation_s']:.1f} s"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
