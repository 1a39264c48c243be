"""The daemon's lifecycle with real processes: `python -m volunteer --home DIR start|status|stop`.

Each daemon runs a real hivemind DHT on 127.0.0.1. Every daemon a test starts is killed
(with its process group, p2pd included) by the fixture's finalizer if it is still alive.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

with warnings.catch_warnings():
    # hivemind's import (via the identity module) runs torch.jit.script, which torch
    # deprecates; the suite turns warnings into errors.
    warnings.simplefilter("ignore", DeprecationWarning)
    from volunteer.daemon.identity import runtime_identity_path

from tests.daemon.homes import CLI_TIMEOUT_S, ROOT, Homes
from volunteer.control.endpoint import socket_path, use_tcp
from volunteer.control.lifecycle import lock_file, output_file, pid_file
from volunteer.paths import Paths

pytestmark = pytest.mark.skipif(use_tcp(), reason="daemon tests use the Unix-socket path")


@pytest.fixture(scope="module")
def homes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Homes]:
    # Serving no blocks: these tests are about the daemon's life, not the model's.
    homes = Homes(tmp_path_factory.mktemp("homes"), VOLUNTEER_NUM_BLOCKS="0")
    try:
        yield homes
    finally:
        homes.reap()


@pytest.fixture(scope="module")
def first(homes: Homes) -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
    """A daemon that started a new swarm, with a public name from its config.toml."""
    home = homes.home("first")
    home.mkdir()
    (home / "config.toml").write_text('public_name = "first-volunteer"\n')
    started = homes.cli(home, "start", "--new-swarm")
    try:
        yield home, started
    finally:
        homes.cli(home, "stop", "--timeout", "10")


def test_start_returns_once_serving_and_prints_how_to_join(
    first: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    _, started = first
    assert started.returncode == 0, started.stderr
    assert "serving" in started.stdout
    assert "volunteer start --join /ip4/127.0.0.1/tcp/" in started.stdout


def test_status_json_has_identity_and_addresses(
    homes: Homes, first: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    home, started = first
    status = homes.status(home)
    assert status["state"] == "serving"
    assert status["public_name"] == "first-volunteer"  # config.toml reached the daemon
    assert status["peer_id"] and status["pid"] == homes.remember(home)
    assert status["multiaddrs"] and all(status["peer_id"] in m for m in status["multiaddrs"])
    assert status["multiaddrs"][0] in started.stdout
    table = homes.cli(home, "status")
    assert table.returncode == 0
    assert "serving" in table.stdout and status["peer_id"] in table.stdout


def test_second_start_with_the_same_home_says_already_running(
    homes: Homes, first: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    home, _ = first
    again = homes.cli(home, "start", "--new-swarm")
    assert again.returncode == 1
    assert f"already running (pid {homes.remember(home)})" in again.stderr


def test_what_the_daemon_creates_is_private_and_its_key_file_is_gone(
    homes: Homes, first: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    paths = Paths.resolve(home=first[0], env=homes.env)
    assert not runtime_identity_path(paths).exists()  # p2pd has read it: removed
    daemon = psutil.Process(homes.remember(first[0]))
    processes = [daemon, *daemon.children(recursive=True)]  # p2pd among them
    sockets = {Path(c.laddr) for p in processes for c in p.net_connections("unix") if c.laddr}
    assert socket_path(paths) in sockets
    assert any(path.name.startswith("hivemind-p2pd-") for path in sockets), sockets
    made = [paths.runtime_dir, paths.log_dir, paths.daemon_log, output_file(paths)]
    made += [pid_file(paths), lock_file(paths), *sockets]
    modes = {str(path): stat.S_IMODE(path.stat().st_mode) for path in made}
    assert {path: oct(mode) for path, mode in modes.items() if mode & 0o077} == {}


def test_two_starts_racing_on_one_home_leave_one_daemon(homes: Homes) -> None:
    home = homes.home("racing")
    argv = [sys.executable, "-m", "volunteer", "--home", str(home), "start"]
    starts = [
        subprocess.Popen(
            argv, cwd=ROOT, env=homes.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [start.communicate(timeout=CLI_TIMEOUT_S) for start in starts]
    winner = homes.remember(home)
    ours = _daemons_of(home)
    homes.pids.update(ours)  # reaped whatever happens
    try:
        assert sorted(start.returncode for start in starts) == [0, 1], outputs
        loser_err = next(
            err for start, (_, err) in zip(starts, outputs, strict=True) if start.returncode
        )
        # Said as such, not as a daemon that failed (the loser's child exits on the lock).
        assert loser_err.startswith("volunteer: already running"), loser_err
        # Exactly one daemon process for this home, the one its pid file names: the
        # losing start's daemon exited without taking the socket or the pid file.
        assert ours == {winner}
        assert homes.status(home)["pid"] == winner
    finally:
        homes.cli(home, "stop", "--timeout", "10")


def test_reload_applies_what_it_can_and_says_what_waits_for_a_restart(
    homes: Homes, first: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    home, _ = first
    config = home / "config.toml"
    original = config.read_text()
    try:
        config.write_text('public_name = "renamed"\ncache_tokens = 64\nnum_blocks = 2\n')
        reloaded = homes.cli(home, "reload")
        assert reloaded.returncode == 0, reloaded.stderr
        assert "applied now: public_name; applied on restart: cache_tokens" in reloaded.stdout
        # VOLUNTEER_NUM_BLOCKS=0 in the daemon's environment wins over the file.
        assert "VOLUNTEER_ variable the daemon started with: num_blocks" in reloaded.stdout
        status = homes.status(home)
        assert status["public_name"] == "renamed" and status["restart_needed"] == ["cache_tokens"]
        assert "restart needed   cache_tokens" in homes.cli(home, "status").stdout

        config.write_text("threads = 0\n")  # a bad file: said, and the daemon serves on
        refused = homes.cli(home, "reload")
        assert refused.returncode == 1 and "threads" in refused.stderr
        status = homes.status(home)
        assert status["state"] == "serving" and status["public_name"] == "renamed"
    finally:
        config.write_text(original)
        homes.cli(home, "reload")
    assert homes.status(home)["restart_needed"] == []


def test_a_second_home_joins_the_first(
    homes: Homes, first: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    maddr = homes.status(first[0])["multiaddrs"][0]
    second = homes.home("second")
    started = homes.cli(second, "start", "--join", maddr)
    try:
        assert started.returncode == 0, started.stderr
        status = homes.status(second)
        assert status["peers_seen"] == 1
        assert status["peer_id"] != homes.status(first[0])["peer_id"]
    finally:
        homes.cli(second, "stop", "--timeout", "10")


def test_a_start_that_fails_says_why(homes: Homes) -> None:
    # A well-formed address where nobody listens: bootstrapping must fail.
    nobody = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWGjsehKx2X7FXb5FZeC67dMVRJVfPpo18eebps8HVyJHg"
    home = homes.home("failing")
    started = homes.cli(home, "start", "--join", nobody)
    assert started.returncode == 1
    assert "daemon failed" in started.stderr and "bootstrap" in started.stderr
    # Reported once the daemon has exited and cleaned up: nothing of it is left.
    paths = Paths.resolve(home=home, env=homes.env)
    assert not pid_file(paths).exists() and not socket_path(paths).exists()


def test_killed_daemon_is_replaced_and_stop_cleans_up(homes: Homes) -> None:
    home = homes.home("killed")
    paths = Paths.resolve(home=home, env=homes.env)
    assert homes.cli(home, "start").returncode == 0
    killed_pid = homes.remember(home)
    assert killed_pid is not None
    os.killpg(killed_pid, signal.SIGKILL)
    _wait_gone(killed_pid)
    assert pid_file(paths).exists()  # a SIGKILL leaves the pid file behind

    restarted = homes.cli(home, "start")
    assert restarted.returncode == 0, restarted.stderr
    new_pid = homes.remember(home)
    assert new_pid not in (None, killed_pid)

    stopped = homes.cli(home, "stop")
    assert stopped.returncode == 0
    assert f"stopped (pid {new_pid})" in stopped.stdout
    _wait_gone(new_pid)
    assert not pid_file(paths).exists()
    assert not socket_path(paths).exists()
    status = homes.cli(home, "status")
    assert status.returncode == 3 and "not running" in status.stdout
    assert "not running" in homes.cli(home, "stop").stdout


def test_restart_keeps_the_peer_id(homes: Homes) -> None:
    home = homes.home("identity")
    key_file = runtime_identity_path(Paths.resolve(home=home, env=homes.env))
    assert homes.cli(home, "start").returncode == 0
    before = homes.status(home)["peer_id"]
    assert not key_file.exists()
    assert homes.cli(home, "stop").returncode == 0
    key_file.write_bytes(b"left by a daemon killed while starting")
    assert homes.cli(home, "start").returncode == 0
    try:
        assert homes.status(home)["peer_id"] == before
        assert not key_file.exists()  # the stale one was replaced, then removed
    finally:
        homes.cli(home, "stop")
    assert not key_file.exists()


def _daemons_of(home: Path) -> set[int]:
    """Live daemon processes started for `home` (zombies awaiting their reaper excluded)."""
    found = set()
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        alive = process.info["status"] != psutil.STATUS_ZOMBIE
        if alive and str(home) in cmdline and "--foreground" in cmdline:
            found.add(process.pid)
    return found


def _wait_gone(pid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} is still alive")
