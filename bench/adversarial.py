"""Honest generation speed beside hostile peers: an honest 2-server swarm alone vs with each
attacker of `bench/attackers.py` running beside it (issue 14's target: >= 0.8 of alone).

The swarm is as in `bench/swarm_generate.py` (whose helpers this imports): real `python -m
volunteer` daemons on 127.0.0.1 serving the embedded SmolLM2-135M, blocks 0:15 and 15:30,
behind a bootstrap daemon that serves nothing; the client is this process. It generates
`--tokens` tokens greedily, `--repeats` times alone, then beside each attacker (a child
process: its own loop and CPU share, as a stranger's machine), then alone again; the
baseline is the median over both alone phases, so that drift in the machine's speed does
not tilt the ratios. Every run must give the alone run's tokens. Meanwhile the servers'
resident memory (each daemon and its children, p2pd included) is sampled; its peak per
phase shows what the session and message floods cost them. Each server's CPU time per
generated token is shown as its Python process's plus its p2pd's: what an attacker's
requests cost a server beyond serving.

By default every byte goes through the p2p daemons, as between machines (the attackers
have no other way in); `--local-links yes` lets the honest client use the daemons' Unix
sockets instead. Attackers, daemons and client share this machine's cores, so each
attacker runs at the least CPU priority (`attackers.py` lowers its own niceness to 19
and takes Linux's idle scheduling class, and its p2p daemons inherit both): across
machines the attacker's own CPU would not count against the honest swarm, and here it
takes only what the swarm leaves idle. What the
servers spend on the attacker's requests counts in full, as it would anywhere. The
attacker's CPU seconds are shown beside its counters.

Prints a table, then one JSON line with `ratio_<attack>` per attack.

    python bench/adversarial.py [--tokens 64] [--repeats 3] [--sybils 4] [--attacks a,b]
        [--server-threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attackers import ATTACKS

HERE = Path(__file__).resolve().parent
SERVERS = {"server0": "0:15", "server1": "15:30"}
READY_TIMEOUT_S = 150.0
STOP_TIMEOUT_S = 60.0
RSS_EVERY_S = 0.25


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per generation (64)")
    parser.add_argument("--repeats", type=int, default=3, help="generations per phase (3)")
    parser.add_argument("--sybils", type=int, default=4, help="identities per attacker (4)")
    parser.add_argument(
        "--context", type=int, default=2048, help="max_length of each flooding session (2048)"
    )
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset")
    parser.add_argument("--settle-s", type=float, default=3.0, help="attack before measuring")
    parser.add_argument(
        "--server-threads",
        type=int,
        default=1,
        help="torch threads per daemon (1: on a 2-core machine, a core each, as on machines "
        "of their own; with more, their OpenMP teams and the flood's handling oversubscribe "
        "the cores, and each stalls the others)",
    )
    parser.add_argument("--local-links", choices=("yes", "no"), default="no")
    args = parser.parse_args()
    args.attacks = [name for name in args.attacks.split(",") if name]
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    return args


class PeakRss:
    """The highest RSS (MiB) of each server while in the `with` block, sampled in a thread."""

    def __init__(self, daemons: Any) -> None:
        self.daemons = daemons
        self.peak = dict.fromkeys(SERVERS, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(RSS_EVERY_S):
            for name in SERVERS:
                with contextlib.suppress(Exception):  # a daemon gone is seen by the client
                    self.peak[name] = max(self.peak[name], self.daemons.memory(name)[0])

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def _attacker(name: str, command: list[str], env: dict[str, str], log: Path) -> Iterator[dict]:
    """Runs one attacker until the block ends; yields the dict its counters land in."""
    counts: dict[str, Any] = {}
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(HERE / "attackers.py"), name, *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            text=True,
            start_new_session=True,  # its group holds its p2p daemons too
        )
    try:
        ready = _read_line(process, READY_TIMEOUT_S)
        if ready != "ready":
            raise RuntimeError(f"attacker {name} did not start ({ready!r}); see {log}")
        yield counts
    finally:
        counts["cpu_s"] = round(_cpu_seconds(process.pid), 1)
        process.stdin.close()  # type: ignore[union-attr]  # the attacker's cue to stop
        with contextlib.suppress(json.JSONDecodeError):
            counts.update(json.loads(_read_line(process, STOP_TIMEOUT_S)))
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, 9)


def _cpu_seconds(pid: int) -> float:
    """CPU time used so far by a process and its children (its p2p daemons)."""
    return sum(_cpu_split(pid))


def _cpu_split(pid: int) -> tuple[float, float]:
    """CPU time used so far by a process itself, and by its children (p2pd) together."""
    import psutil

    own, children = 0.0, 0.0
    with contextlib.suppress(psutil.NoSuchProcess):
        process = psutil.Process(pid)
        times = process.cpu_times()
        own = times.user + times.system
        for each in process.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                times = each.cpu_times()
                children += times.user + times.system
    return own, children


class ServerCpu:
    """CPU seconds each server spent in the `with` block: its Python process, its p2pd."""

    def __init__(self, daemons: Any) -> None:
        self.daemons = daemons
        self.spent: dict[str, tuple[float, float]] = {}

    def __enter__(self) -> ServerCpu:
        self._start = {name: _cpu_split(self.daemons.pids[name]) for name in SERVERS}
        return self

    def __exit__(self, *exc: object) -> None:
        for name, (own, children) in self._start.items():
            now = _cpu_split(self.daemons.pids[name])
            self.spent[name] = (now[0] - own, now[1] - children)


def _read_line(process: subprocess.Popen, timeout_s: float) -> str:
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return got[0].strip() if got else "no answer in time"


def _phase(sg: Any, open_stepper: Any, prompt: list[int], args: argparse.Namespace) -> dict:
    """`args.repeats` generations; a failed one counts 0 tokens/s and ends the phase."""
    tps: list[float] = []
    tokens: list[list[int]] = []
    error = None
    for _ in range(args.repeats):
        try:
            run = sg._generate(open_stepper, prompt, args.tokens)
        except Exception as exc:
            tps.append(0.0)
            error = f"{type(exc).__name__}: {exc}"[:300]
            break
        tps.append(args.tokens / run.seconds)
        tokens.append(run.tokens)
    return {"tps": tps, "tokens": tokens, "error": error}


def main() -> None:
    args = _parse()
    from volunteer.machine.cpu_sharing import sleeping_threads_env

    # As `volunteer chat --swarm` runs: idle OpenMP workers sleep (read when torch loads).
    os.environ.update(sleeping_threads_env(os.environ))
    import swarm_generate as sg  # torch and the model: only past --help

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="adversarial-bench-") as tmp:
        setup = sg.embedded_setup(
            Path(tmp), threads=args.server_threads, local_links=args.local_links
        )
        phases = _bench(sg, setup, args)
    _report(phases, args, load_start)


def _bench(sg: Any, setup: Any, args: argparse.Namespace) -> dict[str, dict]:
    daemons = setup.daemons("adversarial")
    phases: dict[str, dict] = {}
    try:
        daemons.start("boot", "--num-blocks", "0")
        for name, span in SERVERS.items():
            daemons.start(name, "--blocks", span)
        command = ["--join", daemons.join, "--model", setup.swarm_name]
        for name in SERVERS:
            command += ["--server", f"{daemons.status(name)['peer_id']}:{daemons.blocks[name]}"]
        command += ["--num-blocks", str(setup.config.num_layers)]
        command += ["--hidden", str(setup.config.hidden_size), "--context", str(args.context)]
        command += ["--sybils", str(args.sybils)]
        with sg.SwarmConnection([daemons.join]) as connection:
            open_stepper = setup.open_stepper(connection)
            sg._generate(open_stepper, setup.prompt, 8)  # warm-up: connections, caches
            for phase in ["alone", *args.attacks, "alone again"]:
                sg._log(f"phase: {phase}")
                with contextlib.ExitStack() as stack:
                    counts: dict = {}
                    if phase in ATTACKS:
                        log = setup.tmp / f"{phase}.log"
                        counts = stack.enter_context(_attacker(phase, command, setup.env, log))
                        time.sleep(args.settle_s)
                    with PeakRss(daemons) as rss, ServerCpu(daemons) as cpu:
                        result = _phase(sg, open_stepper, setup.prompt, args)
                result["rss_mib"] = rss.peak
                result["server_cpu_s"] = cpu.spent
                result["attacker"] = counts
                phases[phase] = result
    finally:
        daemons.close()
    return phases


def _report(phases: dict[str, dict], args: argparse.Namespace, load_start: float) -> None:
    alone = phases["alone"]["tps"] + phases["alone again"]["tps"]
    baseline = statistics.median(alone)
    reference = phases["alone"]["tokens"][0] if phases["alone"]["tokens"] else None
    figures: dict[str, Any] = {
        "tokens": args.tokens,
        "repeats": args.repeats,
        "sybils": args.sybils,
        "local_links": args.local_links,
        "alone_tps": round(baseline, 2),
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
    }
    print(
        f"\n{'phase':16s} {'tok/s':>7s} {'ratio':>6s} {'same':>5s} {'peak RSS MiB':>14s} "
        f"{'server CPU s/token':>22s}  notes"
    )
    for phase, result in phases.items():
        tps = statistics.median(result["tps"])
        ratio = tps / baseline
        same = bool(result["tokens"]) and all(t == reference for t in result["tokens"])
        rss = "/".join(f"{mib:.0f}" for mib in result["rss_mib"].values())
        made = max(1, args.tokens * len(result["tokens"]))
        cpu = "/".join(
            f"{own / made:.3f}+{p2pd / made:.3f}" for own, p2pd in result["server_cpu_s"].values()
        )
        notes = result["error"] or json.dumps(result["attacker"])
        print(f"{phase:16s} {tps:7.2f} {ratio:6.3f} {same!s:>5s} {rss:>14s} {cpu:>22s}  {notes}")
        key = phase.replace(" ", "_")
        figures[f"tps_{key}"] = round(tps, 2)
        figures[f"peak_rss_mib_{key}"] = [round(mib, 1) for mib in result["rss_mib"].values()]
        figures[f"server_cpu_s_{key}"] = [
            [round(t, 2) for t in pair] for pair in result["server_cpu_s"].values()
        ]
        if phase in ATTACKS:
            figures[f"ratio_{key}"] = round(ratio, 3)
            figures[f"identical_{key}"] = same
            figures[f"error_{key}"] = result["error"]
    worst = min((figures[f"ratio_{a}"] for a in args.attacks), default=None)
    figures["worst_ratio"] = worst
    figures["target_met"] = worst is not None and worst >= 0.8
    print(
        f"\n{os.cpu_count()} CPUs shared by the daemons, this client and the attacker "
        f"(1-min load {figures['load_avg_1m'][0]} at start, {figures['load_avg_1m'][1]} at end)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
