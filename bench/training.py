"""Collaborative training (issue 23): speed of a swarm, cost of CenteredClip, and the
loss under each of BTARD's attacks and the two on the pipeline.

1. **Throughput.** A 2-stage x 2-peer swarm on loopback (`volunteer.training.loopback`:
   each peer and the driver on a p2p daemon of its own, all in this process) trains a
   random Llama; one process trains the same model on the same batches. Sequences per
   second of each and their ratio, measured in this run.
2. **CenteredClip.** For 8, 16 and 64 peers and a part of `--size` floats, one round of
   CenteredClip (median start, clipped-mean steps; a third of the peers hostile, so that
   clipping binds) against the plain mean of the same vectors.
3. **Attacks.** 2 stages x 3 peers of a tiny model, one attacker per stage: the loss of
   the last `--tail` steps (one pass over the data) for the clean run, the attacked run
   aggregated with the mean and no validators, with CenteredClip alone, and with
   CenteredClip, validators and bans; with the step each attacker was banned at. An
   attacker that starts at once is on probation: its first share is recomputed.
4. **Evidence.** The throughput swarm with a sign-flip attacker in stage 1: the
   evidence its validator publishes (bytes), and what a stranger spends on it: parsing
   and checking the signature and digests, then recomputing on a fresh stage; against
   one process's training step of the whole model on one batch, measured in this run.

    python bench/training.py [--only throughput,clip,attacks,evidence] [--size 1000000]
                             [--attacks sign-flip,wrong-activations]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import sys
import time

ATTACKS = (
    "sign-flip", "random-direction", "label-flip", "stale:2", "ipm", "alie",
    "wrong-activations", "wrong-input-grads",
)  # fmt: skip


def _timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm
    runs = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - began)
    return statistics.median(runs)


def _model(hidden: int, layers: int, vocab: int, seed: int):  # type: ignore[no-untyped-def]
    import torch
    from volunteer.models.config import ModelConfig
    from volunteer.models.model import BlockSpan, ModelEnds

    config = ModelConfig(
        arch="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 5 // 2,
        num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
        rms_norm_eps=1e-5, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(seed)
    full = BlockSpan(config, 0, layers)
    return full, ModelEnds(config).eval().requires_grad_(False)


def _job(data, *, stages, batch: int, micro: int, steps: int, aggregation):  # type: ignore[no-untyped-def]
    from volunteer.training.data import shard_hash
    from volunteer.training.job import DataShard, Optimizer, TrainingJob

    return TrainingJob(
        model="bench-random", num_blocks=stages[-1][1], trains="blocks", stages=stages,
        shards=(DataShard(sha256=shard_hash(data), sequences=len(data)),),
        sequence_length=data.shape[1] - 1, batch_size=batch, microbatch_size=micro,
        optimizer=Optimizer(name="adamw", lr=3e-3, weight_decay=0.01),
        aggregation=aggregation, seed=7, steps=steps,
    )  # fmt: skip


def _sub(full, start: int, end: int):  # type: ignore[no-untyped-def]
    from volunteer.models.model import BlockSpan

    part = BlockSpan(full.config, start, end)
    for index in range(start, end):
        part.blocks[index - start].load_state_dict(full.blocks[index].state_dict())
    part.forget_weights()
    return part


def _swarm_run(full, ends, job, data, stages: list[int], **options):  # type: ignore[no-untyped-def]
    from volunteer.training.loopback import start_loopback_swarm

    async def run():  # type: ignore[no-untyped-def]
        swarm = await start_loopback_swarm(
            job, data, span_for=lambda a, b: _sub(full, a, b), ends=ends, stages=stages,
            **options,
        )  # fmt: skip
        try:
            await swarm.driver.run_step()  # warm: connections, first allocations
            began = time.perf_counter()
            reports = [await swarm.driver.run_step() for _ in range(job.steps - 1)]
            return reports, time.perf_counter() - began, swarm.driver.banned, swarm.peers
        finally:
            await swarm.close()

    return asyncio.run(run())


def _alone_speed(full, ends, job, data) -> float:  # type: ignore[no-untyped-def]
    import torch

    from volunteer.training.stage import sequence_losses

    span = copy.deepcopy(full).train()
    optimizer = torch.optim.AdamW(span.parameters(), lr=job.optimizer.lr, weight_decay=0.01)

    def step(index: int) -> None:
        rows = data[(index * job.batch_size + torch.arange(job.batch_size)) % len(data)]
        loss = sequence_losses(ends, span(ends.embed(rows[:, :-1])), rows[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        span.forget_weights()

    step(0)
    began = time.perf_counter()
    for index in range(1, job.steps):
        step(index)
    return (job.steps - 1) * job.batch_size / (time.perf_counter() - began)


def throughput(args: argparse.Namespace) -> None:
    import torch

    from volunteer.training.job import Aggregation

    full, ends = _model(args.hidden, args.layers, 512, seed=0)
    data = torch.randint(
        0, 512, (4 * args.batch, args.sequence + 1), generator=torch.Generator().manual_seed(1)
    )
    half = args.layers // 2
    stages = ((0, half), (half, args.layers))
    job = _job(data, stages=stages, batch=args.batch, micro=args.micro, steps=args.steps,
               aggregation=Aggregation(kind="mean"))  # fmt: skip
    alone = _alone_speed(full, ends, job, data)
    _, seconds, _, _ = _swarm_run(full, ends, job, data, [0, 0, 1, 1], rebalance=False, checks=0)
    swarm = (job.steps - 1) * job.batch_size / seconds
    _, seconds, _, _ = _swarm_run(full, ends, job, data, [0, 0, 1, 1], rebalance=False, checks=1)
    checked = (job.steps - 1) * job.batch_size / seconds
    print(f"Throughput: {args.layers} blocks of width {args.hidden}, batch {args.batch} x "
          f"{args.sequence} tokens, microbatch {args.micro}; torch threads "
          f"{torch.get_num_threads()}, one machine")  # fmt: skip
    print(f"  one process                 {alone:8.2f} sequences/s")
    print(f"  swarm 2 stages x 2 peers    {swarm:8.2f} sequences/s  ({swarm / alone:.2f}x)")
    print(f"  same, one share checked     {checked:8.2f} sequences/s  ({checked / alone:.2f}x)")


def evidence_cost(args: argparse.Namespace) -> None:
    import torch

    from volunteer.training.evidence import TrainingEvidence
    from volunteer.training.job import Aggregation
    from volunteer.training.stage import StageTrainer

    full, ends = _model(args.hidden, args.layers, 512, seed=0)
    data = torch.randint(
        0, 512, (4 * args.batch, args.sequence + 1), generator=torch.Generator().manual_seed(1)
    )
    half = args.layers // 2
    job = _job(data, stages=((0, half), (half, args.layers)), batch=args.batch,
               micro=args.micro, steps=2, aggregation=Aggregation(kind="mean"))  # fmt: skip
    step_s = job.batch_size / _alone_speed(full, ends, job.model_copy(update={"steps": 4}), data)
    filed = []
    _swarm_run(
        full, ends, job, data, [0, 0, 1, 1], rebalance=False, checks=1,
        faults={3: "sign-flip"}, on_accuse=lambda *accused: filed.append(accused[1]),
    )  # fmt: skip
    if not filed:
        print("Evidence: no validator filed any (the attacker was not checked)")
        return
    raw = filed[0].to_bytes()

    def check() -> None:
        TrainingEvidence.from_bytes(raw).checked()

    def recompute() -> None:
        evidence = TrainingEvidence.from_bytes(raw)
        claim = evidence.checked()
        start, end = job.stages[claim.stage]
        trainer = StageTrainer(_sub(full, start, end), job.optimizer, seed=job.seed)
        evidence.load_into(trainer, claim)
        evidence.distances(trainer, ends, claim)

    checked_s = _timed(check, args.repeats)
    judged_s = _timed(recompute, args.repeats)
    print(f"Evidence: stage {half}:{args.layers} of the throughput model, a sign-flipped "
          f"share of {args.batch // 2} sequences; one process's training step "
          f"{step_s * 1e3:.1f} ms")  # fmt: skip
    print(f"  evidence                    {len(raw) / 2**20:8.2f} MiB")
    for what, seconds in (("parse + signature + digests", checked_s),
                          ("all that + recompute", judged_s)):  # fmt: skip
        print(f"  {what:<27} {seconds * 1e3:8.1f} ms  ({seconds / step_s:.2f}x a step)")


def clip_cost(args: argparse.Namespace) -> None:
    import torch

    from volunteer.training.centered_clip import centered_clip

    torch.manual_seed(0)
    print(f"CenteredClip: one part of {args.size} floats per peer, a third of the peers "
          f"hostile; torch threads: {torch.get_num_threads()}")  # fmt: skip
    print(f"{'peers':>5} {'mean ms':>9} {'clip ms':>9} {'x mean':>8} {'steps':>6} {'far':>4}")
    for peers in (8, 16, 64):
        honest = peers - peers // 3
        center = torch.randn(args.size)
        vectors = torch.cat(
            [
                center + 0.001 * torch.randn(honest, args.size),
                center + 100.0 * torch.randn(peers - honest, args.size),
            ]
        )
        result = centered_clip(vectors, tau=1.0)
        mean_s = _timed(lambda v=vectors: v.mean(0), args.repeats)
        clip_s = _timed(lambda v=vectors: centered_clip(v, tau=1.0), args.repeats)
        print(f"{peers:>5} {1e3 * mean_s:>9.1f} {1e3 * clip_s:>9.1f} {clip_s / mean_s:>8.1f} "
              f"{result.iterations:>6} {len(result.far):>4}")  # fmt: skip


def attacks(args: argparse.Namespace) -> None:
    import torch

    from volunteer.training.job import Aggregation

    full, ends = _model(64, 4, 97, seed=0)
    with torch.no_grad():
        for name, param in full.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
    full.forget_weights()
    data = torch.randint(0, 97, (48, 9), generator=torch.Generator().manual_seed(11))
    steps = args.attack_steps

    def run(aggregation, faults, checks):  # type: ignore[no-untyped-def]
        job = _job(data, stages=((0, 2), (2, 4)), batch=12, micro=2, steps=steps + 1,
                   aggregation=aggregation)  # fmt: skip
        reports, _, banned, peers = _swarm_run(
            full, ends, job, data, [0, 0, 0, 1, 1, 1], rebalance=False, checks=checks,
            faults=faults,
        )  # fmt: skip
        tail = sum(r.loss for r in reports[-args.tail :]) / args.tail
        ids = {peers[0].peer_id: "stage 0", peers[3].peer_id: "stage 1"}
        when = ", ".join(f"{ids.get(p, 'an honest peer')} at {s}" for p, s in banned.items())
        return tail, when or "none"

    mean = Aggregation(kind="mean")
    clip = Aggregation(kind="centered-clip", tau=args.tau)
    clean, _ = run(mean, {}, 0)
    clean_clip, _ = run(clip, {}, 1)
    print(f"Attacks: 2 stages x 3 peers, one attacker per stage (peers 0 and 3), "
          f"{steps} steps, loss of the last {args.tail}; CenteredClip tau {args.tau}; "
          "validators recompute newcomers' shares, then one drawn per stage and round")  # fmt: skip
    print(f"  clean: mean {clean:.4f}, CenteredClip + validators {clean_clip:.4f}")
    print(f"{'attack':>17} {'mean':>7} {'x clean':>8} {'clip':>7} {'x clean':>8} "
          f"{'clip+bans':>9} {'x clean':>8}  banned (stage at step)")  # fmt: skip
    for attack in args.attacks.split(","):
        faults = {0: attack, 3: attack}
        attacked, _ = run(mean, faults, 0)
        clipped, _ = run(clip, faults, 0)
        defended, when = run(clip, faults, 1)
        ratios = (attacked / clean, clipped / clean, defended / clean)
        print(f"{attack:>17} {attacked:>7.4f} {ratios[0]:>8.3f} {clipped:>7.4f} "
              f"{ratios[1]:>8.3f} {defended:>9.4f} {ratios[2]:>8.3f}  {when}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="throughput,clip,attacks,evidence", help="parts to run")
    parser.add_argument("--size", type=int, default=1_000_000, help="floats in one part")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case")
    parser.add_argument("--hidden", type=int, default=256, help="throughput model width")
    parser.add_argument("--layers", type=int, default=8, help="throughput model blocks")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--micro", type=int, default=4, help="sequences per microbatch")
    parser.add_argument("--sequence", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=6, help="throughput steps (1 warm)")
    parser.add_argument("--attack-steps", type=int, default=12, help="steps per attack run")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="attacks to run")
    parser.add_argument("--tail", type=int, default=4, help="steps whose loss is compared")
    parser.add_argument("--tau", type=float, default=0.05, help="CenteredClip's radius")
    args = parser.parse_args()
    import logging

    # Drills and bans say so in the log; the tables below say it once.
    logging.basicConfig(level=logging.ERROR)
    parts = {
        "throughput": throughput, "clip": clip_cost, "attacks": attacks, "evidence": evidence_cost,
    }  # fmt: skip
    for name in args.only.split(","):
        parts[name](args)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
