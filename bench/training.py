"""Collaborative training (issue 23), as far as it is built: the cost of CenteredClip.

Each peer of a stage aggregates its part of the stage's gradient from every peer of the
stage with CenteredClip instead of the mean (`volunteer.training.centered_clip`). For 8,
16 and 64 peers and a part of `--size` floats, the time of one round of CenteredClip
(the median and its clipped-mean steps, here with one peer in three hostile so that
clipping binds) against the plain mean of the same vectors, in this run.

    python bench/training.py [--size 1000000] [--repeats 5] [--peers 8,16,64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm
    runs = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - began)
    return statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="floats in one part")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case")
    parser.add_argument("--peers", default="8,16,64", help="peers per stage, comma-separated")
    parser.add_argument("--tau", type=float, default=1.0, help="the clipping radius")
    args = parser.parse_args()
    import torch  # only past --help

    from volunteer.training.centered_clip import centered_clip

    torch.manual_seed(0)
    print(f"One part of {args.size} floats per peer, a third of the peers hostile; "
          f"torch threads: {torch.get_num_threads()}")  # fmt: skip
    print(f"{'peers':>5} {'mean ms':>9} {'clip ms':>9} {'x mean':>8} {'steps':>6} {'far':>4}")
    for peers in [int(each) for each in args.peers.split(",")]:
        honest = peers - peers // 3
        center = torch.randn(args.size)
        vectors = torch.cat(
            [
                center + 0.001 * torch.randn(honest, args.size),
                center + 100.0 * torch.randn(peers - honest, args.size),
            ]
        )
        result = centered_clip(vectors, tau=args.tau)
        mean_s = _timed(lambda v=vectors: v.mean(0), args.repeats)
        clip_s = _timed(lambda v=vectors: centered_clip(v, tau=args.tau), args.repeats)
        print(
            f"{peers:>5} {1e3 * mean_s:>9.1f} {1e3 * clip_s:>9.1f} {clip_s / mean_s:>8.1f} "
            f"{result.iterations:>6} {len(result.far):>4}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
