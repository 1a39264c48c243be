"""Swarm generation speed: SmolLM2-135M through daemons on loopback vs this process.

Greedy from one chat prompt with the end token disabled, for 64 and 256 new tokens
(median of 3 runs each): the whole model in one process, then the blocks served by real
`python -m volunteer` daemons on 127.0.0.1 — 1 server (0:30), 2 servers (0:15, 15:30) and
3 servers (0:10, 10:20, 20:30), each swarm fresh behind its own bootstrap daemon that
serves nothing. The client embeds tokens and computes logits either way, so the swarm
output must equal the local output token for token.

`--dtype` (fp32 by default) is the form of the served weights: the daemons start with
`--dtype FORM`, the client routes through servers of that form only (`weights_format`) and
holds its LM head as `volunteer chat --swarm --dtype FORM` does (8 bits for int8 and q4),
and the local reference holds the model as the swarm splits it: the ends as the client
holds them (float32), the blocks in the form, the hidden states cast to the blocks' dtype
and back as a server casts them (which differs from `load_causal_lm(fmt=bf16)` only in
bf16, whose local model keeps its ends in bfloat16 too).

The local reference runs in a child process with libgomp's default OpenMP wait policy
(its fastest setting alone), once before the swarms and once after, and its medians are
taken over both, so that drift in this machine's speed does not tilt the ratios. The
swarm client is this process, set up as `volunteer chat --swarm` is (idle OpenMP workers
sleep, see `volunteer.machine.cpu_sharing`), as are the daemons.

Also measures each swarm's time to first token (from the call to the first token: the
session or cache set-up and the prefill included), each server's launch time (`volunteer
start` until serving) and resident memory (the daemon and its children, p2pd included),
and the failover stall: with 0:15 on one server and 15:30 on two replicas, the replica
serving the session is killed with its process group mid-generation; the stall is the
time from the kill to the next token. Prints a table, then one JSON line with every
figure, including `ratio_1` / `ratio_2` / `ratio_3` (swarm tokens/s divided by local
tokens/s for 256 tokens; `ratio_N_64` for 64).

The daemons and this client share one machine, so by default they reach each other on
the daemons' Unix sockets (`volunteer.transport.local_link`), as any swarm processes of one
machine do; `--local-links no` sends everything through the p2p daemons, as between
machines (`local_links_N` counts each server's local links).

    python bench/swarm_generate.py [--repeats 3] [--server-threads 2] [--local-links no]
                                   [--dtype fp32|bf16|int8|q4]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import torch
from volunteer.models.checkpoint import load_causal_lm, load_ends
from volunteer.models.config import ModelConfig
from volunteer.models.generation import LocalStepper, StepFn, generate_tokens
from volunteer.models.model import ModelEnds
from volunteer.models.quant import QuantError
from volunteer.models.sampling import Sampler, SamplingParams
from volunteer.models.tokenizer import Tokenizer
from volunteer.models.weight_format import WeightFormat, compress_head

from volunteer.client.stepper import SwarmStepper, open_swarm_stepper
from volunteer.client.swarm_connection import SwarmConnection
from volunteer.daemon.span_plan import block_footprint
from volunteer.machine.cpu_sharing import sleeping_threads_env
from volunteer.model_cache.served_model import swarm_model_name
from volunteer.model_cache.smollm2 import DEFAULT_MODEL
from volunteer.model_cache.store import ModelStore
from volunteer.paths import Paths

PROMPT = "What is the capital of France?"
LENGTHS = (64, 256)
SWARMS = {1: ("0:30",), 2: ("0:15", "15:30"), 3: ("0:10", "10:20", "20:30")}
FAILOVER_SERVERS = {"head": "0:15", "replica_a": "15:30", "replica_b": "15:30"}
FAILOVER_TOKENS = 64
KILL_AFTER = 8
"""The serving replica dies after this many tokens of the failover run."""
ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 150.0
OPEN_TIMEOUT_S = 60.0
STEP_TIMEOUT_S = 120.0
CLOSE_TIMEOUT_S = 10.0
MIB = 1024 * 1024
FP32 = WeightFormat("fp32")

OpenStepper = Callable[[int, int], contextlib.AbstractContextManager[StepFn]]
"""(prompt_len, max_new_tokens) -> a context manager giving a step function."""


@dataclasses.dataclass
class Run:
    began: float
    """perf_counter() at the call."""
    opened_s: float
    """Until the step function was ready (cache allocated, or route opened)."""
    stamps: list[float]
    """Seconds from the call to each token."""
    tokens: list[int]

    @property
    def seconds(self) -> float:
        return self.stamps[-1]

    @property
    def ttft_s(self) -> float:
        return self.stamps[0]


_BEGAN = time.perf_counter()


def _log(message: str) -> None:
    elapsed = time.perf_counter() - _BEGAN
    print(f"[swarm_generate {elapsed:6.1f} s] {message}", file=sys.stderr, flush=True)


def _generate(
    open_stepper: OpenStepper,
    prompt: list[int],
    n: int,
    on_token: Callable[[int, StepFn], None] | None = None,
) -> Run:
    """Greedy, stop tokens ignored: exactly n tokens, each one time-stamped."""
    sampler = Sampler(SamplingParams(temperature=0))
    stamps: list[float] = []
    tokens: list[int] = []
    began = time.perf_counter()
    with open_stepper(len(prompt), n) as step:
        opened_s = time.perf_counter() - began
        generated = generate_tokens(
            step, prompt, max_new_tokens=n, sampler=sampler, stop_token_ids=frozenset()
        )
        for token in generated:
            stamps.append(time.perf_counter() - began)
            tokens.append(token)
            if on_token is not None:
                on_token(len(tokens), step)
    return Run(began, opened_s, stamps, tokens)


def _measure(open_stepper: OpenStepper, prompt: list[int], repeats: int) -> dict[int, list[Run]]:
    _generate(open_stepper, prompt, 8)  # warm-up: allocations, connections, round trips
    return {n: [_generate(open_stepper, prompt, n) for _ in range(repeats)] for n in LENGTHS}


@contextlib.contextmanager
def _local_stepper(model: Any, prompt_len: int, n: int) -> Iterator[StepFn]:
    yield LocalStepper.for_generation(model, prompt_len=prompt_len, max_new_tokens=n)


class Daemons:
    """The daemons of one swarm, `python -m volunteer --home DIR ...` each.

    `close` stops them gracefully, then kills every process group still there (each
    daemon leads its own session, so its group holds its p2pd too).
    """

    def __init__(
        self,
        root: Path,
        folder: Path,
        env: dict[str, str],
        threads: int,
        local_links: str,
        dtype: str = "fp32",
    ) -> None:
        self.root = root
        self.folder = folder
        self.env = env
        self.threads = threads
        self.local_links = local_links
        self.dtype = dtype
        """The form the servers hold their weights in (`--dtype`)."""
        self.join = ""
        self.pids: dict[str, int] = {}
        self.blocks: dict[str, str] = {}
        self.launch_s: dict[str, float] = {}

    def cli(self, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "volunteer", "--home", str(self.root / name), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )

    def start(self, name: str, *flags: str) -> None:
        where = ["--join", self.join] if self.join else ["--new-swarm"]
        model = ["--model", str(self.folder), "--threads", str(self.threads)]
        model += ["--local-links", self.local_links, "--dtype", self.dtype]
        began = time.perf_counter()
        result = self.cli(name, "start", *model, *where, *flags)
        self.launch_s[name] = time.perf_counter() - began
        status = self.status(name)
        if status.get("pid"):  # a start that timed out leaves its daemon running
            self.pids[name] = status["pid"]
        if result.returncode != 0 or status.get("state") != "serving":
            raise RuntimeError(f"starting {name} failed: {result.stderr.strip() or status}")
        if not self.join:
            self.join = status["multiaddrs"][0]
        blocks = status.get("blocks")
        self.blocks[name] = f"{blocks[0]}:{blocks[1]}" if blocks else "-"
        _log(f"{name} serving blocks {self.blocks[name]} after {self.launch_s[name]:.2f} s")

    def status(self, name: str) -> dict[str, Any]:
        result = self.cli(name, "status", "--json")
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            return {"state": "unknown", "error": result.stderr.strip()}

    def memory(self, name: str) -> tuple[float, int]:
        """RSS in MiB of the daemon and all its descendants, and how many processes."""
        process = psutil.Process(self.pids[name])
        total, count = 0, 0
        for each in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += each.memory_info().rss
                count += 1
        return total / MIB, count

    def kill(self, name: str) -> None:
        os.killpg(self.pids[name], signal.SIGKILL)

    def close(self) -> None:
        servers = [name for name in self.pids if name != "boot"]
        with ThreadPoolExecutor(max_workers=max(1, len(servers))) as pool:
            list(pool.map(self._stop, servers))
        if "boot" in self.pids:  # last: the servers announce leaving through it
            self._stop("boot")
        for pid in self.pids.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def _stop(self, name: str) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            # At once: a bench's swarm is going away whole, nobody takes blocks over.
            self.cli(name, "stop", "--now", "--timeout", "10")


@dataclasses.dataclass
class Setup:
    folder: Path
    config: ModelConfig
    swarm_name: str
    prompt: list[int]
    ends: ModelEnds
    env: dict[str, str]
    tmp: Path
    threads: int
    local_links: str
    """"yes": the daemons and this client, on one machine, talk over Unix sockets."""
    bare_rss: int
    """Bytes resident in a bare Python process that imported torch."""
    fmt: WeightFormat = FP32
    """The form the servers hold their weights in; the client routes through no other."""

    def rss_ratio(self, rss_mib: float, blocks: str) -> float | None:
        """RSS beyond a bare torch process, per byte of the weights the server holds (in
        its form)."""
        if blocks == "-":
            return None
        start, end = (int(part) for part in blocks.split(":"))
        weights = (end - start) * block_footprint(self.config, self.fmt).weight_bytes
        return (rss_mib * MIB - self.bare_rss) / weights

    def daemons(self, label: str) -> Daemons:
        root = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.tmp))
        return Daemons(root, self.folder, self.env, self.threads, self.local_links, self.fmt.label)

    def open_stepper(self, connection: SwarmConnection) -> OpenStepper:
        client = connection.client(
            model=self.swarm_name,
            num_blocks=self.config.num_layers,
            weights_format=self.fmt.label,
        )
        loop = connection.loop

        def open_stepper(prompt_len: int, n: int) -> contextlib.AbstractContextManager[StepFn]:
            return open_swarm_stepper(
                client,
                loop,
                self.ends,
                max_length=prompt_len + n,
                open_timeout_s=OPEN_TIMEOUT_S,
                step_timeout_s=STEP_TIMEOUT_S,
                close_timeout_s=CLOSE_TIMEOUT_S,
            )

        return open_stepper


def daemon_env(paths: Paths) -> dict[str, str]:
    """The daemons' environment: our options only, not this shell's VOLUNTEER_* settings,
    and no validator role (its probes of the servers would be part of what is measured)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLUNTEER_")}
    env.pop(_CLIENT_MARK, None)
    env["VOLUNTEER_CACHE_DIR"] = str(paths.cache_dir)
    env["VOLUNTEER_VALIDATE_SHARE"] = "0"
    return env


def embedded_setup(tmp: Path, *, threads: int, local_links: str, fmt: WeightFormat = FP32) -> Setup:
    """The embedded model's swarm set-up for a bench of daemons in `tmp` (the other
    benches' entry: no bare-process RSS measured), its servers' weights in `fmt`."""
    paths = Paths.from_environ()
    folder = ModelStore(paths.models_dir).resolve(DEFAULT_MODEL)
    config = ModelConfig.from_hf_folder(folder)
    prompt = Tokenizer.from_folder(folder).encode_chat([{"role": "user", "content": PROMPT}])
    env = daemon_env(paths)
    return _setup(folder, config, prompt, env, tmp, threads, local_links, 0, fmt=fmt)


def _setup(
    folder: Path,
    config: ModelConfig,
    prompt: list[int],
    env: dict[str, str],
    tmp: Path,
    threads: int,
    local_links: str,
    bare_rss: int,
    *,
    fmt: WeightFormat = FP32,
) -> Setup:
    """A `Setup` of the model in `folder`, its swarm name and ends derived (the LM head
    held as `volunteer chat --swarm` holds it for servers in `fmt`)."""
    ends = load_ends(folder, config, dtype=fmt.activation_dtype).eval()
    compress_head(ends, fmt)
    return Setup(
        folder=folder,
        config=config,
        swarm_name=swarm_model_name(str(folder), folder),
        prompt=prompt,
        ends=ends,
        env=env,
        tmp=tmp,
        threads=threads,
        local_links=local_links,
        bare_rss=bare_rss,
        fmt=fmt,
    )


def _bare_torch_rss() -> int:
    code = "import psutil, torch; print(psutil.Process().memory_info().rss)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout)


def _bench_swarm(setup: Setup, spans: tuple[str, ...], repeats: int) -> dict[str, Any]:
    daemons = setup.daemons(f"swarm{len(spans)}")
    try:
        daemons.start("boot", "--num-blocks", "0")
        servers = [f"server{index}" for index in range(len(spans))]
        for name, span in zip(servers, spans, strict=True):
            daemons.start(name, "--blocks", span)
        with SwarmConnection([daemons.join]) as connection:
            runs = _measure(setup.open_stepper(connection), setup.prompt, repeats)
        statuses = {name: daemons.status(name) for name in servers}
        memory = {name: daemons.memory(name) for name in ["boot", *servers]}
    finally:
        daemons.close()
    for name in servers:
        _log(f"{name}: {statuses[name].get('tokens_served')} tokens served")
        if not statuses[name].get("tokens_served"):
            raise RuntimeError(f"{name} served no tokens: the blocks did not run remotely")
    return {
        "runs": runs,
        "servers": [
            {
                "name": name,
                "blocks": daemons.blocks[name],
                "launch_s": daemons.launch_s[name],
                "rss_mib": memory[name][0],
                "rss_ratio": setup.rss_ratio(memory[name][0], daemons.blocks[name]),
                "processes": memory[name][1],
                "local_links": statuses[name].get("local_links") if name in statuses else None,
            }
            for name in ["boot", *servers]
        ],
    }


def _bench_failover(setup: Setup, local_tokens: list[int]) -> dict[str, Any]:
    daemons = setup.daemons("failover")
    killed: dict[str, Any] = {}

    def kill_the_serving_replica(count: int, step: StepFn) -> None:
        if count != KILL_AFTER:
            return
        replicas = [name for name, span in FAILOVER_SERVERS.items() if span == "15:30"]
        statuses = {name: daemons.status(name) for name in replicas}
        serving = [name for name in replicas if statuses[name].get("open_sessions", 0) > 0]
        assert isinstance(step, SwarmStepper)
        route_peers = {hop.peer_id for hop in step.session.route}
        on_route = [name for name in replicas if statuses[name].get("peer_id") in route_peers]
        if len(serving) != 1 or serving != on_route:
            _log(f"open_sessions says {serving}, the route says {on_route}: using the route")
            serving = on_route
        killed["name"] = serving[0]
        daemons.kill(serving[0])
        killed["at"] = time.perf_counter()
        _log(f"killed {serving[0]} (pid {daemons.pids[serving[0]]}) after {count} tokens")

    try:
        daemons.start("boot", "--num-blocks", "0")
        for name, span in FAILOVER_SERVERS.items():
            daemons.start(name, "--blocks", span)
        with SwarmConnection([daemons.join]) as connection:
            open_stepper = setup.open_stepper(connection)
            _generate(open_stepper, setup.prompt, 8)  # warm-up
            run = _generate(open_stepper, setup.prompt, FAILOVER_TOKENS, kill_the_serving_replica)
    finally:
        daemons.close()
    stall_s = run.began + run.stamps[KILL_AFTER] - killed["at"]
    gaps = [b - a for a, b in zip(run.stamps, run.stamps[1:], strict=False)]
    del gaps[KILL_AFTER - 1]  # the stall itself
    return {
        "stall_s": stall_s,
        "step_s": statistics.median(gaps),
        "killed": killed["name"],
        "identical": run.tokens == local_tokens[:FAILOVER_TOKENS],
        "launch_s": [daemons.launch_s[name] for name in FAILOVER_SERVERS],
    }


def _tps(runs: list[Run], n: int) -> float:
    return n / statistics.median(run.seconds for run in runs)


def _ttft(runs: dict[int, list[Run]]) -> float:
    return statistics.median(run.ttft_s for n in LENGTHS for run in runs[n])


def _local_part(folder: Path, prompt: list[int], repeats: int, fmt: WeightFormat) -> None:
    """`--local-part`: the whole model in this process, split as the swarm splits it;
    prints the runs as JSON."""
    # As a swarm client and its servers hold it (`SwarmChat.load` holds the ends so).
    model = load_causal_lm(folder, fmt=fmt)
    runs = _measure(functools.partial(_local_stepper, model), prompt, repeats)
    print(json.dumps({n: [dataclasses.asdict(run) for run in runs[n]] for n in LENGTHS}))


def _local_in_child(repeats: int, threads: int, fmt: WeightFormat) -> dict[int, list[Run]]:
    """The local reference, run in a fresh process with libgomp's default (spinning)
    OpenMP workers: the fastest setting for one process alone on the machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.pop(_CLIENT_MARK, None)
    command = [sys.executable, __file__, "--local-part", "--repeats", str(repeats)]
    command += ["--threads", str(threads), "--dtype", fmt.label]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    raw = json.loads(result.stdout.splitlines()[-1])
    return {int(n): [Run(**run) for run in runs] for n, runs in raw.items()}


def _as_swarm_client() -> None:
    """Re-runs this script as a swarm client runs (`volunteer.machine.cpu_sharing`): idle OpenMP
    workers sleep. libgomp reads that when torch loads, hence the fresh process."""
    if os.environ.get(_CLIENT_MARK):
        return
    env = {**os.environ, **sleeping_threads_env(os.environ), _CLIENT_MARK: "1"}
    os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)


_CLIENT_MARK = "SWARM_BENCH_CLIENT"


def _weight_format(label: str) -> WeightFormat:
    try:
        return WeightFormat.parse(label)
    except QuantError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads here (0: default)")
    parser.add_argument(
        "--server-threads", type=int, default=2, help="torch threads of each daemon (2)"
    )
    parser.add_argument(
        "--local-links",
        choices=("yes", "no"),
        default="yes",
        help="daemons serve this machine's processes on Unix sockets (yes; no: all via p2p)",
    )
    parser.add_argument(
        "--dtype",
        type=_weight_format,
        default=FP32,
        metavar="FORM",
        help="form of the served weights: fp32 (default), bf16, int8, q4 (q4g64, q4g128)",
    )
    parser.add_argument("--local-part", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.local_part:
        _as_swarm_client()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    paths = Paths.from_environ()
    folder = ModelStore(paths.models_dir).resolve(DEFAULT_MODEL)
    config = ModelConfig.from_hf_folder(folder)
    tokenizer = Tokenizer.from_folder(folder)
    prompt = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    if args.local_part:
        _local_part(folder, prompt, args.repeats, args.dtype)
        return
    env = daemon_env(paths)

    # Measured before and after the swarms, the medians taken over both: this machine's
    # speed drifts over minutes, and the ratios must not ride on that drift.
    _log(f"local generation in {args.dtype.label}, {len(prompt)} prompt tokens")
    local = _local_in_child(args.repeats, torch.get_num_threads(), args.dtype)
    local_tokens = {n: local[n][-1].tokens for n in LENGTHS}

    figures: dict[str, Any] = {
        "dtype": args.dtype.label,
        "local_links": args.local_links,
        "threads": torch.get_num_threads(),
        "server_threads": args.server_threads,
        "prompt_tokens": len(prompt),
    }
    rows = [("local", local, True)]
    bare_rss = _bare_torch_rss()
    servers: list[tuple[int, dict[str, Any]]] = []
    launches: list[float] = []
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        setup = _setup(
            folder,
            config,
            prompt,
            env,
            Path(tmp),
            args.server_threads,
            args.local_links,
            bare_rss,
            fmt=args.dtype,
        )
        for count, spans in SWARMS.items():
            _log(f"swarm of {count} server(s): {', '.join(spans)}")
            result = _bench_swarm(setup, spans, args.repeats)
            runs = result["runs"]
            identical = all(run.tokens == local_tokens[n] for n in LENGTHS for run in runs[n])
            rows.append((f"swarm, {count} server{'s' if count > 1 else ''}", runs, identical))
            for n in LENGTHS:
                figures[f"swarm{count}_tps_{n}"] = round(_tps(runs[n], n), 2)
            figures[f"ttft_{count}_s"] = round(_ttft(runs), 3)
            figures[f"open_session_{count}_s"] = round(
                statistics.median(run.opened_s for n in LENGTHS for run in runs[n]), 3
            )
            figures[f"identical_{count}"] = identical
            hosts = result["servers"][1:]  # without the bootstrap
            figures[f"rss_mib_{count}"] = [round(s["rss_mib"], 1) for s in hosts]
            figures[f"processes_{count}"] = [s["processes"] for s in hosts]
            figures[f"launch_to_serving_s_{count}"] = [round(s["launch_s"], 2) for s in hosts]
            figures[f"boot_rss_mib_{count}"] = round(result["servers"][0]["rss_mib"], 1)
            figures[f"rss_ratio_{count}"] = [round(s["rss_ratio"], 3) for s in hosts]
            figures[f"local_links_{count}"] = [s["local_links"] for s in hosts]
            launches.extend(s["launch_s"] for s in hosts)
            servers.extend((count, s) for s in result["servers"])
        _log("failover: 0:15 plus two replicas of 15:30; killing the serving one")
        failover = _bench_failover(setup, local_tokens[FAILOVER_TOKENS])
    figures["bare_torch_rss_mib"] = round(bare_rss / MIB, 1)
    figures["rss_ratio"] = figures["rss_ratio_1"][0]  # the target's case: 30 blocks
    _log("local generation again")
    local_after = _local_in_child(args.repeats, torch.get_num_threads(), args.dtype)
    figures["local_identical_before_after"] = all(
        run.tokens == local_tokens[n] for n in LENGTHS for run in local_after[n]
    )
    for n in LENGTHS:
        local[n] += local_after[n]
        figures[f"local_tps_{n}"] = round(_tps(local[n], n), 2)
    figures["local_ttft_s"] = round(_ttft(local), 3)
    for count in SWARMS:
        runs = rows[count][1]
        figures[f"ratio_{count}"] = round(_tps(runs[256], 256) / _tps(local[256], 256), 3)
        figures[f"ratio_{count}_64"] = round(_tps(runs[64], 64) / _tps(local[64], 64), 3)
    launches.extend(failover["launch_s"])
    figures["launch_to_serving_s"] = round(statistics.median(launches), 2)
    figures["failover_stall_s"] = round(failover["stall_s"], 3)
    figures["failover_step_s"] = round(failover["step_s"], 4)
    figures["failover_identical"] = failover["identical"]
    figures["load_avg_1m"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    _log("done")

    local_tps = {n: _tps(local[n], n) for n in LENGTHS}
    header = f"{'tok/s 64':>9s} {'tok/s 256':>10s} {'ratio 64':>9s} {'ratio 256':>10s}"
    print(f"{'weights ' + args.dtype.label:18s} {header} {'TTFT s':>7s}  identical to local")
    for label, runs, identical in rows:
        tps = {n: _tps(runs[n], n) for n in LENGTHS}
        print(
            f"{label:18s} {tps[64]:9.2f} {tps[256]:10.2f} {tps[64] / local_tps[64]:9.3f} "
            f"{tps[256] / local_tps[256]:10.3f} {_ttft(runs):7.3f}  {identical}"
        )
    print(
        f"\n{'swarm':>5s} {'server':10s} {'blocks':>6s} {'launch s':>9s} {'RSS MiB':>8s} procs"
        f"  RSS beyond torch / weights (bare torch {bare_rss / MIB:.0f} MiB)"
    )
    for count, server in servers:
        ratio = f"{server['rss_ratio']:.3f}" if server["rss_ratio"] else "-"
        print(
            f"{count:5d} {server['name']:10s} {server['blocks']:>6s} {server['launch_s']:9.2f} "
            f"{server['rss_mib']:8.1f} {server['processes']:5d}  {ratio}"
        )
    print(
        f"\nfailover: killed {failover['killed']} after {KILL_AFTER} tokens; next token "
        f"{failover['stall_s']:.3f} s after the kill (a normal step: "
        f"{failover['step_s'] * 1000:.1f} ms); identical to local: {failover['identical']}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
