"""Fine-tuning in the daemon: a real daemon on 127.0.0.1 serving the real SmolLM2 trains
through its own swarm client. `volunteer finetune` (the daemon's job) saves an adapter
that `volunteer chat --adapter` answers with; a malformed file fails the job with its
line number while the daemon keeps answering; Ctrl-C stops a job with a checkpoint, and
a second job is refused while one runs. (And, without a daemon: a job's series stay
bounded for the control API.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon.homes import ROOT, Homes, one_daemon
from volunteer.control.client import ControlClient
from volunteer.control.endpoint import ControlError, use_tcp
from volunteer.control.messages import (
    ADAPTERS,
    CHAT,
    FINETUNE_START,
    FINETUNE_STATUS,
    FINETUNE_STOP,
    MAX_SERIES_POINTS,
    STATUS,
    FinetuneJob,
    FinetuneRequest,
)
from volunteer.daemon.finetune_service import _Job
from volunteer.finetune.trainer import Progress
from volunteer.paths import Paths

real_daemon = pytest.mark.skipif(use_tcp(), reason="daemon tests use the Unix-socket path")

TEACH = ROOT / "tests" / "finetune" / "data" / "teach.jsonl"
WAIT_S = 120.0
FAST = ("--method", "ptune", "--prompt-len", "2", "--batch-size", "2", "--heldout-every", "2")
"""A soft prompt of two positions, two short chats a step: steps of a fraction of a second."""


class Daemon:
    def __init__(self, homes: Homes, home: Path) -> None:
        self.homes, self.home = homes, home
        self.paths = Paths.resolve(home=home, env=homes.env)
        self.control = ControlClient(self.paths)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.homes.cli(self.home, *args)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        command = [sys.executable, "-m", "volunteer", "--home", str(self.home), *args]
        return subprocess.Popen(
            command, cwd=ROOT, env=self.homes.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    def job(self, name: str) -> FinetuneJob:
        return self.control.call(FINETUNE_STATUS, {"name": name}, timeout_s=10)

    def until(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not check():
            assert time.monotonic() < deadline, f"waited {WAIT_S:g} s for {what}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Iterator[Daemon]:
    with one_daemon(tmp_path_factory.mktemp("finetune"), smollm2_folder) as (homes, home):
        yield Daemon(homes, home)


@pytest.mark.slow
@real_daemon
def test_the_daemon_trains_an_adapter_that_chat_answers_with(
    daemon: Daemon, tmp_path: Path
) -> None:
    # A relative path: the CLI resolves it, since the daemon's working folder is not ours.
    data = tmp_path / "teach.jsonl"
    data.write_bytes(TEACH.read_bytes())
    done = subprocess.run(
        [sys.executable, "-m", "volunteer", "--home", str(daemon.home), "finetune",
         "teach.jsonl", "--steps", "4", "--name", "quick", *FAST],
        cwd=tmp_path, env=daemon.homes.env, capture_output=True, text=True, timeout=WAIT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "saved adapter quick (ptune, 4 steps, loss " in done.stdout
    assert "try: volunteer chat --adapter quick" in done.stdout
    assert "4/4 [" in done.stderr  # the progress bar
    job = daemon.job("quick")
    assert (job.state, job.adapter, job.step) == ("done", "quick", 4)
    assert [step for step, _ in job.losses] == [1, 2, 3, 4]
    assert [step for step, _ in job.heldout] == [0, 2, 4] and len(job.speeds) == 4
    rows = {row.name: row for row in daemon.control.call(ADAPTERS, timeout_s=10).adapters}
    assert rows["quick"].method == "ptune" and rows["quick"].steps == 4
    assert rows["quick"].heldout_loss == pytest.approx(job.heldout_loss)
    chat = daemon.cli("chat", "--adapter", "quick", "--max-new-tokens", "3", "Hi")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()
    missing = {"messages": [{"role": "user", "content": "Hi"}], "adapter": "nosuch"}
    with pytest.raises(ControlError, match="no adapter named nosuch"):
        list(daemon.control.call_stream(CHAT, missing, timeout_s=30))


@pytest.mark.slow
@real_daemon
def test_a_malformed_file_fails_the_job_and_the_daemon_serves_on(
    daemon: Daemon, tmp_path: Path
) -> None:
    data = tmp_path / "bad.jsonl"
    good = TEACH.read_text().splitlines()[0]
    data.write_text(f"{good}\n{{not json\n{good}\n")
    request = FinetuneRequest(data=str(data), name="bad", method="ptune", steps=2)
    started = daemon.control.call(FINETUNE_START, request, timeout_s=30)
    assert started.state in ("running", "failed")
    daemon.until(lambda: daemon.job("bad").state == "failed", "the job to fail")
    error = daemon.job("bad").error or ""
    assert f"{data}:2: not valid JSON" in error, error
    assert daemon.control.call(STATUS, timeout_s=10).state == "serving"
    relative = request.model_copy(update={"data": "bad.jsonl"})
    with pytest.raises(ControlError, match="absolute path"):
        daemon.control.call(FINETUNE_START, relative, timeout_s=10)
    with pytest.raises(ControlError, match="bad params: name"):
        daemon.control.call(FINETUNE_START, {"data": str(data), "name": "../x"}, timeout_s=10)


@pytest.mark.slow
@real_daemon
def test_ctrl_c_stops_the_job_with_a_checkpoint_and_one_job_runs_at_a_time(
    daemon: Daemon,
) -> None:
    watcher = daemon.popen("finetune", str(TEACH), "--steps", "100000", "--name", "long", *FAST)
    try:
        daemon.until(lambda: daemon.job("long").step >= 1, "the first step")
        other = FinetuneRequest(data=str(TEACH), name="other", method="ptune", steps=2)
        with pytest.raises(ControlError, match=r"a fine-tuning job \(long, step \d+ of 100000"):
            daemon.control.call(FINETUNE_START, other, timeout_s=10)
        watcher.send_signal(signal.SIGINT)
        _, stderr = watcher.communicate(timeout=WAIT_S)
    finally:
        watcher.kill()
        watcher.communicate()
        # Whatever happened above, no job of this test outlives it.
        daemon.control.call(FINETUNE_STOP, timeout_s=30)
        daemon.until(lambda: daemon.job("long").state not in ("running", "stopping"), "a stop")
    assert watcher.returncode == 130, stderr
    job = daemon.job("long")
    assert job.state == "stopped"
    assert f"stopped at step {job.step}; the same command resumes it" in stderr
    checkpoint = daemon.paths.data_dir / "adapters" / ".checkpoints" / "long"
    progress = json.loads((checkpoint / "progress.json").read_text())
    assert progress["step"] == job.step >= 1


@pytest.mark.slow
@real_daemon
def test_a_daemon_that_stops_stops_its_job_with_a_checkpoint(daemon: Daemon) -> None:
    request = FinetuneRequest(data=str(TEACH), name="cut", method="ptune", prompt_len=2,
                              batch_size=2, steps=100000)  # fmt: skip
    daemon.control.call(FINETUNE_START, request, timeout_s=30)
    daemon.until(lambda: daemon.job("cut").step >= 1, "the first step")
    stopped = daemon.cli("stop", "--now")
    assert stopped.returncode == 0, stopped.stderr
    progress = daemon.paths.data_dir / "adapters" / ".checkpoints" / "cut" / "progress.json"
    assert json.loads(progress.read_text())["step"] >= 1


def test_a_jobs_series_are_thinned_keep_their_ends_and_skip_nan() -> None:
    job = _Job(FinetuneRequest(data="/data/x.jsonl", name="long", steps=100_000))
    progress = Progress(steps=100_000, heldout=[(0, 3.0)])
    for step in range(1, 20_001):
        progress.step, progress.loss = step, 1 / step
        progress.losses.append((step, progress.loss))
        progress.speeds.append((step, float("nan") if step == 5 else 100.0))
        job.update(progress)
    reply = job.reply()
    assert (reply.step, reply.loss, reply.heldout) == (20_000, 1 / 20_000, [(0, 3.0)])
    assert len(reply.losses) <= MAX_SERIES_POINTS
    assert reply.losses[0] == (1, 1.0) and reply.losses[-1] == (20_000, 1 / 20_000)
    steps = [step for step, _ in reply.losses]
    assert steps == sorted(set(steps)) and 5 not in [step for step, _ in reply.speeds]
    assert len(reply.model_dump_json()) < 64_000  # far below a control message's 1 MiB
