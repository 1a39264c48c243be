"""`max_cpu_percent` under load: the CPU a serving daemon really uses, against its limit.

For each limit of `--percents` (100, the reference, first), one daemon serving all of the
embedded SmolLM2's blocks starts with `--max-cpu-percent P`, and `--clients` chat clients
(`volunteer chat --swarm`: their own processes, so none of their work is the daemon's)
keep it busy for `--seconds`. The daemon's CPU use is its process tree's CPU time (p2pd
included) over that window, as a share of all the machine's cores; beside it, the limit,
the difference in points (target: within 10) and the tokens/s the daemon served (its
status' `tokens_served`), against the reference's.

    python bench/cpu_limit.py [--percents 100,50,25] [--seconds 20] [--clients 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "Count from 1 to 500, separated by commas."
NEW_TOKENS = "256"
TARGET_POINTS = 10.0


def _log(message: str) -> None:
    print(f"[cpu_limit] {message}", file=sys.stderr, flush=True)


def _tree_cpu_s(pid: int) -> float:
    import psutil

    from volunteer.machine.owner_sensors import tree_cpu_s

    return tree_cpu_s(psutil.Process(pid))


def _client_loop(daemons, stop: threading.Event) -> None:  # type: ignore[no-untyped-def]
    command = [sys.executable, "-m", "volunteer", "--home", str(daemons.root / "client")]
    command += ["chat", "--swarm", daemons.join, "--model", str(daemons.folder)]
    command += ["--dtype", "fp32", "--max-new-tokens", NEW_TOKENS, "--verify", "off"]
    while not stop.is_set():
        done = subprocess.run(
            [*command, PROMPT], env=daemons.env, capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            _log(f"a chat failed: {done.stderr.strip()[-300:]}")
            stop.wait(1.0)


def _one_limit(sg, setup, percent: float, args: argparse.Namespace) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import psutil

    root = setup.tmp / f"limit-{percent:g}"
    root.mkdir()
    # No --threads: the limit chooses them (a share of the cores, then a duty cycle).
    daemons = sg.Daemons(root, setup.folder, setup.env, threads=0, local_links="no")
    try:
        started = daemons.cli(
            "server", "start", "--model", str(setup.folder), "--new-swarm", "--blocks", "0:30",
            "--local-links", "no", "--dtype", "fp32", "--max-cpu-percent", f"{percent:g}",
        )  # fmt: skip
        status = daemons.status("server")
        if started.returncode != 0 or status.get("state") != "serving":
            raise RuntimeError(f"the daemon did not start: {started.stderr or status}")
        daemons.pids["server"] = status["pid"]
        daemons.join = status["multiaddrs"][0]
        stop = threading.Event()
        clients = [
            threading.Thread(target=_client_loop, args=(daemons, stop), daemon=True)
            for _ in range(args.clients)
        ]
        for client in clients:
            client.start()
        time.sleep(args.warmup)  # the clients load their ends and open sessions first
        served = daemons.status("server").get("tokens_served", 0)
        before, began = _tree_cpu_s(status["pid"]), time.monotonic()
        time.sleep(args.seconds)
        used = _tree_cpu_s(status["pid"]) - before
        elapsed = time.monotonic() - began
        got = daemons.status("server").get("tokens_served", 0) - served
        stop.set()
        for client in clients:
            client.join(timeout=600)
    finally:
        daemons.close()
    cores = psutil.cpu_count() or 1
    measured = 100.0 * used / (elapsed * cores)
    _log(f"limit {percent:g}%: the daemon used {measured:.1f}% of {cores} cores")
    return {"limit": percent, "measured": measured, "tokens": got, "seconds": elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--percents", default="100,50,25", help="limits, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per limit")
    parser.add_argument("--warmup", type=float, default=8.0, help="load before measuring")
    parser.add_argument("--clients", type=int, default=3, help="chat clients at once")
    args = parser.parse_args()
    import swarm_generate as sg  # torch and the daemon helpers: only past --help

    percents = [float(p) for p in args.percents.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        setup = sg.embedded_setup(Path(tmp), threads=os.cpu_count() or 1, local_links="no")
        for percent in percents:
            rows.append(_one_limit(sg, setup, percent, args))
    reference = rows[0]
    print(f"\n{'limit %':>8} {'used %':>8} {'points off':>11} {'tok/s':>8} {'/ first':>8}  target",
          file=sys.stderr)  # fmt: skip
    for row in rows:
        off = row["measured"] - row["limit"]
        # Under the limit is within it; the target bounds how far the daemon goes over,
        # or falls short of a limit its load could fill.
        fills = reference["measured"] >= row["limit"]
        met = abs(off) <= TARGET_POINTS if fills else off <= TARGET_POINTS
        ratio = row["tokens"] / reference["tokens"] if reference["tokens"] else float("nan")
        verdict = ("met" if met else "MISSED") if row is not reference else "reference"
        tps = row["tokens"] / row["seconds"]
        line = f"{row['limit']:>8g} {row['measured']:>8.1f} {off:>+11.1f} {tps:>8.1f} "
        print(f"{line}{ratio:>8.2f}  within {TARGET_POINTS:g} points: {verdict}", file=sys.stderr)
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
