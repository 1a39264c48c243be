"""Churn soak: does a swarm of daemons heal itself under stops, kills and restarts (issue 16).

Real `python -m volunteer` daemons on 127.0.0.1 (the helpers of `bench/swarm_generate.py`)
serve the embedded SmolLM2-135M (30 blocks): a bootstrap daemon that serves nothing, then
`--daemons` servers of `--num-blocks` blocks, on default settings otherwise, so each
chooses its own span and must move to fill holes. For `--minutes`, a schedule seeded by
`--seed` acts about every 30 s: a clean stop (`volunteer stop`, in the background: a stop
may keep serving until another daemon takes its blocks over), a SIGKILL of a daemon's
process group, or a restart of one that is down. Half the stops and kills hit a daemon that
is then the only server of some block; at least `--daemons - 4` servers stay up.

Meanwhile a chat loop generates `--tokens` greedy tokens back to back (no retries here:
waiting out a repair is the client's job); each answer must equal the reference (the
swarm's before the churn, checked against this process's whole model). A monitor reads
the model's DHT records every second: a block is covered while a daemon the bench knows
to be alive has an ONLINE record for it (a killed daemon's records stay until they
expire; a LEAVING one, handing its blocks over, does not count). Each uncovered interval is
charged to the last stop or kill before it began; an event's hole runs from the first
block it uncovered until the last of them is covered again.

Prints a row per event; the chats, their success share (target >= 99%) and answers equal
to the reference (target: all); hole times after clean stops (target: worst <= 30 s) and
after kills (worst <= 60 s); moves (daemon log lines "moved from blocks", "hole move");
the wall time; then one JSON line with every figure and `targets_met`.

    python bench/churn_soak.py [--daemons 12] [--num-blocks 5] [--minutes 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MAX_DOWN = 4  # serving daemons down (or on their way down) at once, at most
EVENT_GAP_S = (20.0, 40.0)  # between events, drawn uniformly: about every 30 s
SAMPLE_S = 1.0
HEAL_WAIT_S = 90.0  # after the churn, the longest wait for the last holes to be repaired
JOIN_S = 60.0
FAILURE_PAUSE_S = 1.0  # after a failed chat: one failing at once must not spin on two cores
STATE_AFTER = {"start": "starting", "stop": "stopping", "kill": "down"}
TARGETS = {"success_share": 0.99, "stop": 30.0, "kill": 60.0}


@dataclasses.dataclass
class Event:
    at: float  # perf_counter() when the bench acted; seconds into the churn once reported
    kind: str  # stop, kill or start
    name: str
    blocks: str
    sole: bool  # the victim was the only live server of some block
    took_s: float | None = None  # until the stop or the start returned
    hole_s: float | None = None
    outcome: str = ""


@dataclasses.dataclass
class Chat:
    began: float
    seconds: float
    equal: bool | None  # None: the chat failed
    error: str = ""


def _brief(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:120]


class Soak:
    def __init__(self, sg: Any, setup: Any, args: argparse.Namespace, began: float) -> None:
        from volunteer.daemon.block_service import ANNOUNCE_PERIOD_S
        from volunteer.swarm.dht_records import record_ttl_s

        self.sg, self.setup, self.args, self.began = sg, setup, args, began
        self.num_blocks = setup.config.num_layers
        self.daemons = setup.daemons("churn")
        # Enough servers stay up that their blocks could still cover the model.
        need = math.ceil(self.num_blocks / args.num_blocks)
        self.min_up = min(args.daemons, max(args.daemons - MAX_DOWN, need))
        self.ttl_s = record_ttl_s(ANNOUNCE_PERIOD_S)  # the daemons announce on the default
        self.lock = threading.Lock()
        self.state: dict[str, str] = {}  # name -> up, stopping, down or starting
        self.peer: dict[str, str] = {}
        self.live: dict[str, str] = {}  # peer id -> name, of the daemons alive now
        # Peer id -> DHT time: a restarted daemon keeps its peer id, and only its records
        # expiring after this were announced by its new process.
        self.fresh_after: dict[str, float] = {}
        self.live_changed = 0.0
        self.servers: list[list[str]] = []  # per block, the live peers ONLINE on it
        self.open_holes: dict[int, float] = {}  # block -> since when
        self.holes: list[tuple[int, float, float | None]] = []  # end None: still open
        self.events: list[Event] = []
        self.chats: list[Chat] = []
        self.chat_began: float | None = None
        self.reads = self.failed_reads = 0
        self.workers: list[threading.Thread] = []
        self.stoppers: list[subprocess.Popen[str]] = []
        self.done_chatting, self.done_watching = threading.Event(), threading.Event()

    def run(self) -> dict[str, Any]:
        from volunteer.models.checkpoint import load_causal_lm

        sg, setup, tokens = self.sg, self.setup, self.args.tokens
        # The whole model here, once, and let go of before the daemons take the memory.
        whole = functools.partial(sg._local_stepper, load_causal_lm(setup.folder))
        local = sg._generate(whole, setup.prompt, tokens).tokens
        del whole
        self.daemons.start("boot", "--num-blocks", "0")
        for index in range(self.args.daemons):
            self.daemons.start(f"d{index:02d}", "--num-blocks", str(self.args.num_blocks))
            self._now_up(f"d{index:02d}")
        started_s = time.perf_counter() - self.began
        with contextlib.ExitStack() as stack:
            watch = stack.enter_context(sg.SwarmConnection([self.daemons.join]))
            talk = stack.enter_context(sg.SwarmConnection([self.daemons.join]))
            monitor = self._spawn(self._monitor, watch)
            self._wait(lambda: self.reads > 0 and not self.open_holes, 60.0)
            if self.open_holes:
                sg._log(f"blocks not covered before the churn: {sorted(self.open_holes)}")
            open_stepper = setup.open_stepper(talk)
            try:
                self.reference = sg._generate(open_stepper, setup.prompt, tokens).tokens
                source = "swarm"
            except Exception as exc:
                sg._log(f"the swarm gave no reference answer ({_brief(exc)}): using the local one")
                self.reference, source = local, "local (the swarm failed before the churn)"
            with self.lock:  # a read before every record had spread is no hole of the churn
                self.churn_began = time.perf_counter()
                self.holes.clear()
            chat = self._spawn(self._chat, open_stepper)
            self._churn()
            sg._log("churn over: waiting for the last holes to be repaired")
            busy = {"stopping", "starting"}  # and their holes may be yet to come
            self._wait(
                lambda: not self.open_holes and not busy & {*self.state.values()}, HEAL_WAIT_S
            )
            self.done_chatting.set()
            chat.join(JOIN_S)
            if chat.is_alive() and self.chat_began is not None:
                running = time.perf_counter() - self.chat_began
                self.chats.append(Chat(self.chat_began, running, None, "unfinished at the end"))
            self.done_watching.set()
            monitor.join(JOIN_S)  # its last read ends before its connection closes
        self.holes += [(block, start, None) for block, start in self.open_holes.items()]
        figures = self._figures(time.perf_counter())
        figures.update(reference_source=source, reference_equals_local=self.reference == local)
        return {**figures, "startup_s": round(started_s, 1)}

    def close(self) -> None:
        """Nothing left running: workers end, then every daemon leaves at once (`stop --now`:
        with all leaving, a hand-over would wait out its grace), then `Daemons.close`
        stops what is left and kills each home's process group."""
        self.done_chatting.set()
        self.done_watching.set()
        for stopper in self.stoppers:
            if stopper.poll() is None:
                stopper.kill()  # the daemon itself is stopped below
        deadline = time.perf_counter() + JOIN_S
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.perf_counter()))
        servers = [name for name in self.daemons.pids if name != "boot"]
        for stopper in [self._cli(name, "stop", "--now") for name in servers]:
            try:
                stopper.communicate(timeout=JOIN_S)
            except subprocess.TimeoutExpired:
                stopper.kill()
        self.daemons.close()

    def _cli(self, name: str, *args: str) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "volunteer", "--home", str(self.daemons.root / name)]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        return subprocess.Popen([*command, *args], cwd=self.sg.ROOT, env=self.daemons.env, **pipes)

    def _spawn(self, target: Any, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.workers.append(thread)
        return thread

    def _wait(self, ready: Any, limit_s: float) -> None:
        deadline = time.perf_counter() + limit_s
        while time.perf_counter() < deadline:
            with self.lock:
                if ready():
                    return
            time.sleep(SAMPLE_S)

    def _chat(self, open_stepper: Any) -> None:
        while not self.done_chatting.is_set():
            began = self.chat_began = time.perf_counter()
            try:
                tokens = self.sg._generate(open_stepper, self.setup.prompt, self.args.tokens).tokens
            except Exception as exc:
                self.chats.append(Chat(began, time.perf_counter() - began, None, _brief(exc)))
                self.done_chatting.wait(FAILURE_PAUSE_S)
            else:
                equal = tokens == self.reference
                self.chats.append(Chat(began, time.perf_counter() - began, equal))
            self.chat_began = None

    def _monitor(self, connection: Any) -> None:
        from volunteer.swarm.dht_records import fetch_raw

        previous = time.perf_counter()
        while not self.done_watching.is_set():
            tick = time.perf_counter()
            read = fetch_raw(connection.node, self.setup.swarm_name, self.num_blocks, timeout_s=10)
            try:
                raw = connection.loop_thread.run(read, timeout_s=15)
            except Exception:
                raw = None
            if raw is None:
                self.failed_reads += 1
            else:
                self._observe(raw, previous, time.perf_counter())
                previous = time.perf_counter()
            self.done_watching.wait(max(0.0, SAMPLE_S - (time.perf_counter() - tick)))

    def _observe(self, raw: dict[str, list[Any]], previous: float, now: float) -> None:
        """`read_snapshot_on_node`'s two halves, the records of the dead (and of a
        restarted daemon's earlier process: see `fresh_after`) taken out in between."""
        from volunteer.errors import VolunteerError
        from volunteer.swarm.dht_records import peer_id_from_owner, snapshot_from_raw
        from volunteer.swarm.records import ServerState

        with self.lock:
            live, fresh, changed = dict(self.live), dict(self.fresh_after), self.live_changed
        kept: dict[str, list[Any]] = {}
        for key, entries in raw.items():
            kept[key] = []
            for subkey, value, expires in entries:
                with contextlib.suppress(VolunteerError):  # junk: the snapshot drops it too
                    peer = peer_id_from_owner(subkey)
                    if peer in live and expires > fresh.get(peer, 0.0):
                        kept[key].append((subkey, value, expires))
        snapshot = snapshot_from_raw(self.setup.swarm_name, self.num_blocks, kept)
        online = ServerState.ONLINE
        servers = [[p for p, info in b.items() if info.state is online] for b in snapshot.blocks]
        # A hole began after the previous read, and not before the live set last changed.
        start = max(previous, changed)
        with self.lock:
            self.servers = servers
            self.reads += 1
            for block, peers in enumerate(servers):
                if not peers and block not in self.open_holes:
                    self.open_holes[block] = start
                elif peers and block in self.open_holes:
                    self.holes.append((block, self.open_holes.pop(block), now))

    def _churn(self) -> None:
        rng = random.Random(self.args.seed)
        end = self.churn_began + self.args.minutes * 60
        at = self.churn_began + rng.uniform(*EVENT_GAP_S)
        while at < end:
            time.sleep(max(0.0, at - time.perf_counter()))
            self._event(rng)
            at += rng.uniform(*EVENT_GAP_S)
        time.sleep(max(0.0, end - time.perf_counter()))

    def _event(self, rng: random.Random) -> None:
        with self.lock:
            up = sorted(name for name, state in self.state.items() if state == "up")
            down = sorted(name for name, state in self.state.items() if state == "down")
            sole = {self.live[p[0]] for p in self.servers if len(p) == 1 and p[0] in self.live}
        if down and (len(up) <= self.min_up or rng.random() < 1 / 3):
            self._record(Event(time.perf_counter(), "start", rng.choice(down), "-", False))
            self._spawn(self._start, self.events[-1])
            return
        if len(up) <= self.min_up:
            self.sg._log(f"no event: {len(up)} up, none down")
            return
        kind = "stop" if rng.random() < 0.5 else "kill"
        only = sorted(sole.intersection(up))
        name = rng.choice(only if only and rng.random() < 0.5 else up)
        mine = [index for index, peers in enumerate(self.servers) if self.peer[name] in peers]
        blocks = f"{mine[0]}:{mine[-1] + 1}" if mine else "-"
        event = Event(time.perf_counter(), kind, name, blocks, name in sole)
        self._record(event)
        if kind == "stop":
            self._spawn(self._stop, event)
            return
        try:
            self.daemons.kill(name)
        except ProcessLookupError:
            event.outcome = "already gone"
        self._now_down(name)  # at once: its ONLINE records stay in the DHT until they expire

    def _record(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)
            self.state[event.name] = STATE_AFTER[event.kind]
        sole = ", the only server of some block" if event.sole else ""
        self.sg._log(f"{event.kind} {event.name} (blocks {event.blocks}{sole})")

    def _stop(self, event: Event) -> None:
        stopper = self._cli(event.name, "stop")  # its timeout adds the hand-over's grace
        self.stoppers.append(stopper)
        output = stopper.communicate()[0].strip()
        # Alive until the stop returns: while it hands its blocks over it still serves,
        # and its own records say so (LEAVING, then OFFLINE).
        self._now_down(event.name)
        event.took_s = time.perf_counter() - event.at
        event.outcome = output.splitlines()[-1] if output else f"exit {stopper.returncode}"

    def _start(self, event: Event) -> None:
        try:
            self.daemons.start(event.name, "--num-blocks", str(self.args.num_blocks))
            self._now_up(event.name)
        except Exception as exc:
            event.outcome = f"failed: {_brief(exc)}"
            with self.lock:
                self.state[event.name] = "down"
        else:
            event.outcome = f"serving {self.daemons.blocks[event.name]}"
        event.took_s = time.perf_counter() - event.at

    def _now_up(self, name: str) -> None:
        peer = self.daemons.status(name)["peer_id"]
        with self.lock:
            self.peer[name], self.live[peer], self.state[name] = peer, name, "up"
            self.live_changed = time.perf_counter()

    def _now_down(self, name: str) -> None:
        from hivemind.utils import get_dht_time

        with self.lock:
            self.live.pop(self.peer[name], None)
            self.fresh_after[self.peer[name]] = get_dht_time() + self.ttl_s
            self.state[name] = "down"
            self.live_changed = time.perf_counter()

    def _figures(self, ended: float) -> dict[str, Any]:
        causes = [event for event in self.events if event.kind != "start"]
        charged: dict[int, list[tuple[int, float, float | None]]] = collections.defaultdict(list)
        for hole in self.holes:
            before = [index for index, event in enumerate(causes) if event.at <= hole[1]]
            charged[before[-1] if before else -1].append(hole)
        lengths: dict[str, list[float]] = {"stop": [], "kill": []}
        for index, event in enumerate(causes):
            if holes := charged.get(index):
                hole_s = max(end or ended for _, _, end in holes) - min(s for _, s, _ in holes)
                event.hole_s = round(hole_s, 1)
                lengths[event.kind].append(hole_s)
                if any(end is None for _, _, end in holes):
                    event.outcome += " (hole not repaired)"
        for event in self.events:
            event.at = round(event.at - self.churn_began, 1)
            event.took_s = None if event.took_s is None else round(event.took_s, 1)
        won = [chat for chat in self.chats if chat.equal is not None]
        errors = collections.Counter(chat.error for chat in self.chats if chat.equal is None)
        unrepaired = sorted(block for block, _, end in self.holes if end is None)
        figures = {**vars(self.args), "min_up": self.min_up}
        figures.update(
            chats_attempted=len(self.chats),
            chats_succeeded=len(won),
            success_share=round(len(won) / len(self.chats), 4) if self.chats else 0.0,
            answers_equal=sum(bool(chat.equal) for chat in won),
            chat_s_median=round(statistics.median(c.seconds for c in won), 2) if won else None,
            errors=dict(errors.most_common(5)),
            holes_before_churn=len(charged.get(-1, [])),
            unrepaired_blocks=unrepaired,
            dht_reads=self.reads,
            dht_reads_failed=self.failed_reads,
            events=[dataclasses.asdict(event) for event in self.events],
        )
        met = {
            "success_share": figures["success_share"] >= TARGETS["success_share"],
            "answers_equal": bool(won) and figures["answers_equal"] == len(won),
        }
        for kind, found in lengths.items():
            figures[f"{kind}s"] = sum(event.kind == kind for event in causes)
            figures[f"{kind}_holes"] = len(found)
            figures[f"{kind}_hole_median_s"] = round(statistics.median(found), 1) if found else 0.0
            figures[f"{kind}_hole_worst_s"] = round(max(found), 1) if found else 0.0
            met[f"{kind}_hole"] = max(found, default=0.0) <= TARGETS[kind] and not unrepaired
        return {**figures, "targets_met": met}


def _moves(daemons: Any) -> dict[str, int]:
    """Lines of the daemons' logs: moves made, those made to fill a hole, and every line
    that speaks of holes."""
    from volunteer.paths import Paths

    found = {"moves": 0, "hole_moves": 0, "hole_log_lines": 0}
    for name in daemons.pids:
        log = Paths.resolve(home=daemons.root / name, env=daemons.env).daemon_log
        for path in log.parent.glob(log.name + "*"):  # rotated ones too
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                found["moves"] += "moved from blocks" in line
                found["hole_moves"] += "hole move" in line
                found["hole_log_lines"] += bool(re.search(r"\bholes?\b", line, re.I))
    return found


def _report(figures: dict[str, Any]) -> None:
    head = f"{'at s':>6s} {'event':6s} {'daemon':6s} {'blocks':>6s} {'sole':>5s}"
    print(f"\n{head} {'took s':>7s} {'hole s':>7s}  outcome")
    for e in figures["events"]:
        took = "-" if e["took_s"] is None else f"{e['took_s']:.1f}"
        hole = "-" if e["hole_s"] is None else f"{e['hole_s']:.1f}"
        print(
            f"{e['at']:6.1f} {e['kind']:6s} {e['name']:6s} {e['blocks']:>6s} "
            f"{'yes' if e['sole'] else 'no':>5s} {took:>7s} {hole:>7s}  {e['outcome']}"
        )
    f, met = figures, figures["targets_met"]
    print(f"\nreference: {f['reference_source']}; equal to local: {f['reference_equals_local']}")
    print(
        f"chats attempted: {f['chats_attempted']}, succeeded: {f['chats_succeeded']} "
        f"({f['success_share']:.1%}; target >= 99%: {met['success_share']})"
    )
    for error, count in f["errors"].items():
        print(f"  {count} x {error}")
    print(
        f"answers equal to the reference: {f['answers_equal']} of {f['chats_succeeded']} "
        f"(target all: {met['answers_equal']})"
    )
    for kind in ("stop", "kill"):
        print(
            f"holes after {kind}s: {f[f'{kind}_holes']} of {f[f'{kind}s']}, median "
            f"{f[f'{kind}_hole_median_s']:.1f} s, worst {f[f'{kind}_hole_worst_s']:.1f} s "
            f"(target worst <= {TARGETS[kind]:.0f} s: {met[f'{kind}_hole']})"
        )
    if f["unrepaired_blocks"] or f["holes_before_churn"]:
        print(f"uncovered at the end: blocks {f['unrepaired_blocks']}; before any event: "
              f"{f['holes_before_churn']} hole(s)")  # fmt: skip
    print(
        f"moves made: {f['moves']}, {f['hole_moves']} of them to fill a hole "
        f"(log lines about holes: {f['hole_log_lines']})"
    )
    print(f"wall time: {f['wall_s']:.0f} s (daemons up after {f['startup_s']:.0f} s)")
    print(json.dumps(figures))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--daemons", type=int, default=12, help="serving daemons (12)")
    parser.add_argument("--num-blocks", type=int, default=5, help="blocks per daemon (5)")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the churn (10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the schedule (0)")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per chat (16)")
    return parser.parse_args()


def main() -> None:
    began = time.perf_counter()
    args = _parse()
    from volunteer.machine.cpu_sharing import sleeping_threads_env

    os.environ.update(sleeping_threads_env(os.environ))
    # Each failover the chat client rides out is a warning: hundreds of them in a soak,
    # which the table sums up. Errors still show.
    logging.basicConfig(level=logging.ERROR)
    import swarm_generate as sg  # torch and the model: only past --help

    with tempfile.TemporaryDirectory(prefix="churn-soak-") as tmp:
        setup = sg.embedded_setup(Path(tmp), threads=1, local_links="no")
        if args.daemons * args.num_blocks < setup.config.num_layers:
            sg._log(f"{args.daemons} x {args.num_blocks} blocks cannot cover the model")
        soak = Soak(sg, setup, args, began)
        try:
            figures = soak.run()
        finally:
            soak.close()
        figures.update(_moves(soak.daemons))  # the logs are whole once every daemon stopped
    figures["wall_s"] = round(time.perf_counter() - began, 1)
    figures["targets_met"]["all"] = all(figures["targets_met"].values())
    _report(figures)


if __name__ == "__main__":
    main()
