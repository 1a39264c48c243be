"""What checking servers' steps costs and catches (issue 15's `bench/verification.py`).

The swarm is as in `bench/swarm_generate.py` (whose helpers this imports): real `python -m
volunteer` daemons on 127.0.0.1 serving the embedded SmolLM2-135M in float32 (`--dtype
fp32`), blocks 0:15 and 15:30, behind a bootstrap daemon; the client is this process,
which can compute blocks itself (it loads them from the model's files, in float32 too) to
check or to decide.

1. Speed: tokens/s of the 2-server swarm with verification `off`, `sample` (the default)
   and `all`, `--tokens` greedy tokens `--repeats` times each, a fresh record of checks per
   mode; every run must give the same tokens as `off`. With no second replica, each check
   runs on this process's blocks (on the cores the daemons use). `sample` starts with
   every server a newcomer (every session shadowed at first); `sample_warm` is the same
   client again after `--warm-tokens` more tokens, its record grown, as a client that has
   used the swarm a while.
2. Catching faults: a third daemon serves 15:30 with a drill fault; a client with a fresh
   record generates (verification `sample`) until it bans the drill, at most
   `--max-steps` of the drill's served steps; `perturb:0.05:0.05` runs `--seeds` times for
   the distribution. Shows the drill's steps served (as the routed server or as a
   shadow) and the tokens generated until the ban.
3. False positives: every mismatch counted over the honest runs of 1 (expected: none).
4. Commitments: what signing a step (server) and checking its signature and chain
   (client) cost, in this process, for a one-position step and a 128-position prefill,
   beside the time of a token at `off` (every run above already pays it: servers sign
   always).

Prints a table, then one JSON line.

    python bench/verification.py [--tokens 32] [--repeats 3] [--seeds 5] [--max-steps 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

FAULTS = ("perturb:1.0:0.05", "constant", "stale")
SEEDED_FAULT = "perturb:0.05:0.05"
CHUNK_TOKENS = 16
"""Tokens per generation while waiting for a ban (the record carries over between them)."""


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="tokens per speed run (32)")
    parser.add_argument("--repeats", type=int, default=3, help="speed runs per mode (3)")
    parser.add_argument("--seeds", type=int, default=5, help=f"runs of {SEEDED_FAULT} (5)")
    parser.add_argument("--max-steps", type=int, default=2000, help="drill steps before giving up")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads per daemon")
    parser.add_argument(
        "--warm-tokens", type=int, default=256, help="tokens before the warmed sample runs (256)"
    )
    return parser.parse_args()


def main() -> None:
    args = _parse()
    from volunteer.machine.cpu_sharing import sleeping_threads_env

    os.environ.update(sleeping_threads_env(os.environ))
    import swarm_generate as sg  # torch and the model: only past --help
    from volunteer.models.weight_format import WeightFormat

    with tempfile.TemporaryDirectory(prefix="verification-bench-") as tmp:
        # The daemons start with `--dtype fp32`; the client routes through servers of that
        # form and recomputes their steps in it.
        setup = sg.embedded_setup(
            Path(tmp), threads=args.server_threads, local_links="no", fmt=WeightFormat("fp32")
        )
        figures = _bench(sg, setup, args)
    _report(figures)


def _bench(sg: Any, setup: Any, args: argparse.Namespace) -> dict[str, Any]:
    from volunteer.daemon.local_checks import local_blocks
    from volunteer.model_cache.served_model import ServedModel
    from volunteer.trust.reputation import Reputation

    model = ServedModel(setup.folder, setup.config, setup.swarm_name)
    daemons = setup.daemons("verification")
    figures: dict[str, Any] = {"tokens": args.tokens, "repeats": args.repeats}
    try:
        daemons.start("boot", "--num-blocks", "0")
        daemons.start("server0", "--blocks", "0:15")
        daemons.start("server1", "--blocks", "15:30")
        with sg.SwarmConnection([daemons.join]) as connection:

            def client(mode: str) -> Any:
                made = connection.client(
                    model=setup.swarm_name,
                    num_blocks=setup.config.num_layers,
                    weights_format=setup.fmt.label,
                    verify=mode,
                    local_blocks=local_blocks(model, setup.fmt),
                )
                made.reputation = Reputation()  # a fresh record: every server a newcomer
                made.loop = connection.loop  # where its sessions live, for the steppers
                return made

            figures.update(_speed(sg, setup, client, args))
            figures.update(_commitment_cost(setup.config.hidden_size, figures["tps_off"]))
            for fault in (*FAULTS, *[SEEDED_FAULT] * args.seeds):
                figures.setdefault("faults", []).append(
                    _until_banned(sg, setup, daemons, client, fault, args)
                )
    finally:
        daemons.close()
    return figures


def _speed(sg: Any, setup: Any, client: Any, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    reference = None
    false_positives = 0
    for mode in ("off", "sample", "all"):
        sg._log(f"speed, verification {mode}")
        made = client(mode)
        open_stepper = _open_stepper(sg, setup, made, mode)
        sg._generate(open_stepper, setup.prompt, 4)  # warm-up: connections, loaded blocks
        runs = [sg._generate(open_stepper, setup.prompt, args.tokens) for _ in range(args.repeats)]
        reference = reference or runs[0].tokens
        figures[f"tps_{mode}"] = round(statistics.median(args.tokens / r.seconds for r in runs), 2)
        figures[f"identical_{mode}"] = all(r.tokens == reference for r in runs)
        checked = [p for p in made.reputation if p.passed or p.failed]
        figures[f"checks_{mode}"] = sum(p.passed + p.failed for p in checked)
        false_positives += sum(p.failed for p in checked)
        if mode == "sample":
            sg._log(f"warming the record: {args.warm_tokens} tokens")
            sg._generate(open_stepper, setup.prompt, args.warm_tokens)
            before = sum(p.passed + p.failed for p in made.reputation)
            runs = [
                sg._generate(open_stepper, setup.prompt, args.tokens) for _ in range(args.repeats)
            ]
            tps = statistics.median(args.tokens / r.seconds for r in runs)
            figures["tps_sample_warm"] = round(tps, 2)
            figures["identical_sample_warm"] = all(r.tokens == reference for r in runs)
            after = sum(p.passed + p.failed for p in made.reputation)
            figures["checks_sample_warm"] = after - before
            false_positives += sum(p.failed for p in made.reputation)
    figures["false_positives"] = false_positives
    for mode in ("sample", "sample_warm", "all"):
        figures[f"cost_{mode}"] = round(1 - figures[f"tps_{mode}"] / figures["tps_off"], 3)
    return figures


def _commitment_cost(hidden_size: int, tps_off: float) -> dict[str, Any]:
    """Microseconds to sign a step and to check it, per step size, and their share of a
    token's time at `off`."""
    import torch
    from hivemind.utils.crypto import RSAPrivateKey

    from volunteer.transport.commitment import PeerSigner
    from volunteer.transport.framing import pack_tensor
    from volunteer.trust.step_log import StepLog

    peer = PeerSigner(RSAPrivateKey())
    figures: dict[str, Any] = {}
    for positions in (1, 128):
        signer = peer.open_session(client="c", session_id="s", start=0, end=1)
        log = StepLog(signer.certificate, server=peer.peer_id, session_id="s", start=0, end=1)
        hidden = torch.randn(1, positions, hidden_size)
        output = pack_tensor(torch.randn(1, positions, hidden_size))
        repeats, began = 200, time.perf_counter()
        for step in range(repeats):
            log.follow(step, hidden, output, *signer.step(step, hidden, output))
        micros = (time.perf_counter() - began) / repeats * 1e6
        figures[f"commit_us_{positions}"] = round(micros, 1)
    figures["commit_share_of_token"] = round(figures["commit_us_1"] * 1e-6 * tps_off, 4)
    return figures


def _open_stepper(sg: Any, setup: Any, made: Any, mode: str) -> Any:
    def open_stepper(prompt_len: int, n: int) -> Any:
        return sg.open_swarm_stepper(
            made,
            made.loop,
            setup.ends,
            max_length=prompt_len + n,
            open_timeout_s=sg.OPEN_TIMEOUT_S,
            step_timeout_s=sg.STEP_TIMEOUT_S,
            close_timeout_s=sg.CLOSE_TIMEOUT_S,
            verify=mode,
        )

    return open_stepper


def _until_banned(
    sg: Any, setup: Any, daemons: Any, client: Any, fault: str, args: argparse.Namespace
) -> dict[str, Any]:
    name = "drill"
    if name not in daemons.pids:
        sg._log(f"fault {fault}")
        daemons.start(name, "--blocks", "15:30", "--faults", fault)
    elif daemons.status(name).get("faults") != _canonical(fault):
        daemons._stop(name)
        daemons.pids.pop(name)
        daemons.start(name, "--blocks", "15:30", "--faults", fault)
    drill = daemons.status(name)["peer_id"]
    made = client("sample")
    open_stepper = _open_stepper(sg, setup, made, "sample")
    served_before = daemons.status(name)["requests_served"]
    tokens, began = 0, time.perf_counter()
    while not made.reputation.is_banned(drill):
        served = daemons.status(name)["requests_served"] - served_before
        if served > args.max_steps:
            break
        sg._generate(open_stepper, setup.prompt, CHUNK_TOKENS)
        tokens += CHUNK_TOKENS
    served = daemons.status(name)["requests_served"] - served_before
    return {
        "fault": fault,
        "banned": made.reputation.is_banned(drill),
        "drill_steps": served,
        "tokens": tokens,
        "seconds": round(time.perf_counter() - began, 1),
    }


def _canonical(fault: str) -> str:
    from volunteer.faults import parse_faults

    return str(parse_faults(fault))


def _report(figures: dict[str, Any]) -> None:
    print(f"\n{'verification':14s} {'tok/s':>7s} {'cost':>6s} {'checks':>7s} {'same tokens':>12s}")
    for mode in ("off", "sample", "sample_warm", "all"):
        cost = figures.get(f"cost_{mode}", 0.0)
        print(
            f"{mode:14s} {figures[f'tps_{mode}']:7.2f} {cost:6.1%} "
            f"{figures[f'checks_{mode}']:7d} {figures[f'identical_{mode}']!s:>12s}"
        )
    print(f"false positives over the honest runs: {figures['false_positives']}")
    print(
        f"commitments (sign + check) per step: {figures['commit_us_1']:.0f} us (1 position), "
        f"{figures['commit_us_128']:.0f} us (128); "
        f"{figures['commit_share_of_token']:.2%} of a token at off"
    )
    print(f"\n{'fault':20s} {'banned':>7s} {'drill steps':>12s} {'tokens':>7s} {'seconds':>8s}")
    for run in figures.get("faults", []):
        print(
            f"{run['fault']:20s} {run['banned']!s:>7s} {run['drill_steps']:12d} "
            f"{run['tokens']:7d} {run['seconds']:8.1f}"
        )
    seeded = [r["drill_steps"] for r in figures.get("faults", []) if r["fault"] == SEEDED_FAULT]
    if seeded:
        figures["seeded_drill_steps"] = sorted(seeded)
        print(f"{SEEDED_FAULT}: drill steps to a ban over seeds {sorted(seeded)}")
    figures["target_met"] = figures.get("cost_sample_warm", 1.0) <= 0.10
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
