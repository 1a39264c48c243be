"""Real daemons under each attack of `bench/attackers.py`: the honest chat is unchanged, and
every daemon's memory stays within what its caps allow.

One module-scoped swarm of real `python -m volunteer` daemons on 127.0.0.1 serves the real
SmolLM2: a bootstrap daemon that serves nothing and runs the honest client, and two servers
of blocks 0:15 and 15:30. Local links are off, so every byte between them goes through the
p2p daemons, the only way in that a stranger has too. For each attack, the attacker
script runs as a child process (its own loop, at the least CPU priority, as a stranger's
machine), joins through the bootstrap peer, and attacks from 4 Sybil identities; once it
has run for a few seconds, `volunteer chat` asks twice for 8 greedy tokens through the
bootstrap daemon, and must print exactly what it printed before any attacker came. (The
bad servers are newcomers, which the client tries in a share of its routes only, on
probation: whether a chat meets their bad answers varies from run to run, and
`test_client_bad_servers.py` meets each kind of bad answer on purpose.)

Memory bound (per daemon, its whole process tree with p2pd): the peak RSS with no
attacker, sampled over the honest chats before the attacks, plus what the caps allow a
stranger to make it hold. Every daemon is a DHT node:

- DHT storage: `MAX_STORED_RECORDS` records of at most `MAX_RECORD_BYTES` +
  `MAX_SUBKEY_BYTES`, in the storage and again in the cache
  (`volunteer.swarm.dht_storage`): about 490 MiB;

and each server (15 blocks) also holds, with the caps set below:

- the attention cache: `CACHE_TOKENS` positions of 15 blocks (KV, float32), the most all
  sessions together may reserve: 270 MiB;
- message buffers: `(2 * MAX_SESSIONS + 3 * MAX_QUEUED_JOBS) * MAX_MESSAGE_MIB` — each
  session stream and push stream reads at most one message, each forward/backward call
  holds its input, a gradient and its output (`volunteer.settings.fields`): 120 MiB;
- backward activations: `MAX_BACKWARD_TOKENS` positions of 15 blocks: 32 MiB;

and `SLACK_MIB` for what no cap counts byte by byte: the allocators' fragmentation,
p2pd's per-connection and per-stream buffers (stream counts are capped, connections are
p2pd's own), and the Python objects of the streams the caps admit or refuse. That is
the baseline + about 1040 MiB per server, and + 620 MiB for the bootstrap daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from volunteer.models.config import ModelConfig

from tests.daemon.homes import ROOT, DaemonSwarm, Homes
from volunteer.control.endpoint import use_tcp
from volunteer.daemon.span_plan import block_footprint
from volunteer.swarm.dht_storage import MAX_STORED_RECORDS
from volunteer.swarm.dht_validator import MAX_RECORD_BYTES, MAX_SUBKEY_BYTES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(use_tcp(), reason="daemon tests use the Unix-socket path"),
]

ATTACKER = ROOT / "bench" / "attackers.py"
PROMPT = "What is the capital of France?"
NEW_TOKENS = "8"
SERVERS = {"first": (0, 15), "second": (15, 30)}
SYBILS = 4
FLOOD_CONTEXT = 256
"""max_length of each flooding session: 4 Sybils x 8 sessions (the per-peer cap) x 256
positions fill 8192 of the cache's positions, and leave room for the honest session."""
CACHE_TOKENS = 12288
MAX_MESSAGE_MIB = 1
"""Far above an honest message here (a prompt's hidden states: ~100 KB)."""
MAX_SESSIONS = 48
"""Above what the Sybils may hold (4 x 8 per peer): the honest client still gets one."""
MAX_QUEUED_JOBS = 8
MAX_BACKWARD_TOKENS = 64
SLACK_MIB = 128
MIB = 1 << 20
SETTLE_S = 5.0
"""How long an attack runs before the first honest chat starts."""
REREAD_S = 5.0
"""Between the two chats under each attack. The daemon's client routes a chat with the view
of the swarm it read last (if under a minute old) and reads a new one in the background
(`volunteer.client.swarm_client`): the first chat may route as before the attack, the
second routes with the records the attacker left in the DHT."""
ATTACK_S = 10.0
"""Each attack runs at least this long, the chats included."""
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
CHAT_TIMEOUT_S = 180.0
RSS_EVERY_S = 0.2
ATTACKS = {
    # attack: a counter that shows it really attacked. The signed records of the last
    # three stay in the DHT after their attacker has gone, as a stranger's would: they
    # come last, so that each attack before them meets a clean swarm.
    "dht_wipe": "stored",
    "subkey_flood": "stored",
    "session_flood": "sessions opened",
    "message_flood": "bad frames",
    "endless_messages": "bytes dribbled",
    "fd_exhaustion": "streams opened",
    "push_injection": "pushes sent",
    "joining_poison": "records stored",
    "bad_server": "records stored",
    "forged_records": "records stored",
}


class Swarm(DaemonSwarm):
    """The module's daemons, with local links off, and what the attacker needs of them."""

    def __init__(self, homes: Homes, model: Path) -> None:
        super().__init__(
            homes,
            model,
            new_tokens=NEW_TOKENS,
            chat_timeout_s=CHAT_TIMEOUT_S,
            daemon_flags=("--local-links", "no"),
        )

    def rss_mib(self, name: str) -> float:
        """The resident memory of the daemon and all its children (p2pd included)."""
        process = psutil.Process(self.started[name]["pid"])
        total = 0
        for each in [process, *process.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += each.memory_info().rss
        return total / MIB

    def attacker_args(self) -> list[str]:
        args = ["--join", self.join, "--model", self.started["first"]["swarm_model"]]
        for name, (start, end) in SERVERS.items():
            args += ["--server", f"{self.started[name]['peer_id']}:{start}:{end}"]
        args += ["--num-blocks", "30", "--hidden", "576", "--context", str(FLOOD_CONTEXT)]
        return [*args, "--sybils", str(SYBILS)]


class PeakRss:
    """The highest RSS of each daemon while in the `with` block, sampled in a thread."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.peak = dict.fromkeys(swarm.started, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            for name in self.peak:
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.peak[name] = max(self.peak[name], self.swarm.rss_mib(name))
            if self._stop.wait(RSS_EVERY_S):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _bounds_mib(model: Path, baseline: dict[str, float]) -> dict[str, float]:
    """Each daemon's memory bound (see the module docstring)."""
    footprint = block_footprint(ModelConfig.from_hf_folder(model))
    dht = 2 * MAX_STORED_RECORDS * (MAX_RECORD_BYTES + MAX_SUBKEY_BYTES)
    bounds = {"boot": baseline["boot"] + dht / MIB + SLACK_MIB}
    for name, (start, end) in SERVERS.items():
        blocks = end - start
        cache = CACHE_TOKENS * blocks * footprint.cache_bytes_per_token
        messages = (2 * MAX_SESSIONS + 3 * MAX_QUEUED_JOBS) * MAX_MESSAGE_MIB * MIB
        backward = MAX_BACKWARD_TOKENS * blocks * footprint.activation_bytes_per_token
        held = dht + cache + messages + backward
        bounds[name] = baseline[name] + held / MIB + SLACK_MIB
    return bounds


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Iterator[Swarm]:
    homes = Homes(tmp_path_factory.mktemp("attacked"))
    swarm = Swarm(homes, smollm2_folder)
    caps = ["--cache-tokens", str(CACHE_TOKENS), "--max-message-mib", str(MAX_MESSAGE_MIB)]
    caps += ["--max-sessions", str(MAX_SESSIONS), "--max-queued-jobs", str(MAX_QUEUED_JOBS)]
    caps += ["--max-backward-tokens", str(MAX_BACKWARD_TOKENS)]
    try:
        swarm.start("boot", "--num-blocks", "0")
        for name, (start, end) in SERVERS.items():
            swarm.start(name, "--blocks", f"{start}:{end}", *caps)
        yield swarm
    finally:
        homes.reap()


@pytest.fixture(scope="module")
def honest(swarm: Swarm) -> tuple[str, dict[str, float]]:
    """The chat's answer with no attacker, and each daemon's memory bound."""
    with PeakRss(swarm) as rss:
        answers = [swarm.chat(PROMPT) for _ in range(2)]  # the first one warms the routes up
        began = time.monotonic()
        answers.append(swarm.chat(PROMPT))
        chat_s = time.monotonic() - began
    for answer in answers:
        assert answer.returncode == 0, answer.stderr
    assert answers[0].stdout == answers[1].stdout == answers[2].stdout
    assert "Paris" in answers[2].stdout
    bounds = _bounds_mib(swarm.model, rss.peak)
    peaks = ", ".join(f"{n} {rss.peak[n]:.0f}/{bounds[n]:.0f}" for n in rss.peak)
    print(f"\nno attacker: chat {chat_s:.1f} s; peak/bound RSS MiB {peaks}")
    return answers[2].stdout, bounds


@contextlib.contextmanager
def _attacker(swarm: Swarm, name: str, log: Path) -> Iterator[dict[str, Any]]:
    """Runs `bench/attackers.py NAME` until the block ends; yields its counters' dict,
    filled when it stops."""
    counts: dict[str, Any] = {}
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(ATTACKER), name, *swarm.attacker_args()],
            cwd=ROOT,
            env=swarm.homes.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # its group holds its p2p daemons too
        )
    try:
        ready = _read_line(process, READY_TIMEOUT_S)
        assert ready == "ready", f"attacker {name}: {ready!r}; see {log}"
        yield counts
    finally:
        process.stdin.close()  # type: ignore[union-attr]  # the attacker's cue to stop
        with contextlib.suppress(json.JSONDecodeError):
            counts.update(json.loads(_read_line(process, STOP_TIMEOUT_S)))
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(STOP_TIMEOUT_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]


def _read_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    got: list[str] = []

    def read() -> None:
        # A read given up on may meet the pipe closed under it: nothing to report then.
        with contextlib.suppress(ValueError, OSError):
            got.append(process.stdout.readline())  # type: ignore[union-attr]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    return got[0].strip() if got else "no answer in time"


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_the_honest_chat_and_memory_survive(
    swarm: Swarm, honest: tuple[str, dict[str, float]], attack: str, tmp_path: Path
) -> None:
    answer, bounds = honest
    log = tmp_path / "attacker.log"
    chats: list[tuple[subprocess.CompletedProcess[str], float]] = []
    with PeakRss(swarm) as rss, _attacker(swarm, attack, log) as counts:
        began = time.monotonic()
        time.sleep(SETTLE_S)
        for pause_s in (REREAD_S, 0.0):
            chat_began = time.monotonic()
            chats.append((swarm.chat(PROMPT), time.monotonic() - chat_began))
            time.sleep(pause_s)
        time.sleep(max(0.0, ATTACK_S - (time.monotonic() - began)))
    tail = log.read_text()[-2000:]
    peaks = ", ".join(f"{n} {rss.peak[n]:.0f}/{bounds[n]:.0f}" for n in rss.peak)
    took = " and ".join(f"{seconds:.1f} s" for _, seconds in chats)
    print(f"\n{attack}: chats {took}; peak/bound RSS MiB {peaks}; attacker {counts}")
    assert counts.get(ATTACKS[attack], 0) > 0, f"the attacker did not attack: {counts}\n{tail}"
    assert not [key for key in counts if key.startswith("crashed")], f"{counts}\n{tail}"
    for index, (chat, _) in enumerate(chats):
        assert chat.returncode == 0, f"chat {index}: {chat.stderr}\nattacker: {counts}"
        assert chat.stdout == answer, f"chat {index}; attacker: {counts}"
    for name, peak in rss.peak.items():
        assert peak <= bounds[name], f"{name}: peak RSS {peak:.0f} MiB > {bounds[name]:.0f} MiB"
    for name in swarm.started:  # every daemon still runs
        assert psutil.pid_exists(swarm.started[name]["pid"]), name
