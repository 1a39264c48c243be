"""`volunteer finetune` through the local daemon: the daemon runs the job, we watch it.

The job runs in the daemon (`volunteer.daemon.finetune_service`), so closing this terminal
does not stop it, and the same command run again while it trains watches it again. Ctrl-C
asks the daemon to stop the job after its step, which saves a checkpoint that the same
command resumes; a second Ctrl-C leaves at once (the daemon still stops the job).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pydantic

from volunteer.commands.finetune_cmd import ProgressBar, stop_on_ctrl_c
from volunteer.control.client import ControlClient
from volunteer.control.endpoint import DaemonNotRunningError
from volunteer.control.messages import (
    FINETUNE_START,
    FINETUNE_STATUS,
    FINETUNE_STOP,
    FinetuneJob,
    FinetuneRequest,
    FinetuneStatusParams,
    first_problem,
)
from volunteer.errors import SettingsError, VolunteerError
from volunteer.paths import Paths
from volunteer.transport.protocol import printable

POLL_S = 0.5
CALL_TIMEOUT_S = 30.0
ACTIVE = ("running", "stopping")
NO_DAEMON = (
    "no daemon is running here: start one with `volunteer start` (the job then runs in it), "
    "or train in this process with `--local` (or through a swarm with `--swarm MULTIADDR`)"
)


def run_via_daemon(settings: Any, args: argparse.Namespace, paths: Paths) -> int:
    """Has the daemon train `settings` (a `TrainSettings`) and shows its progress.

    Returns:
        0 once the adapter is saved, 130 when stopped (its checkpoint saved).

    Raises:
        VolunteerError: no daemon runs, it refused the job, or the job failed.
    """
    request = _request(settings, args)
    client = ControlClient(paths)
    try:
        job = _start_or_watch(client, request)
    except DaemonNotRunningError:
        raise VolunteerError(NO_DAEMON) from None
    try:
        return _watch(client, job, request.name)
    except DaemonNotRunningError:
        raise VolunteerError(
            "the daemon went away while training; after `volunteer start` the same command "
            "resumes the job from its checkpoint, if it saved one"
        ) from None


def _request(settings: Any, args: argparse.Namespace) -> FinetuneRequest:
    method = settings.method
    try:
        return FinetuneRequest(
            data=str(Path(settings.data).expanduser().resolve()),  # the daemon's cwd is not ours
            name=settings.name,
            method=method.method,
            steps=settings.steps,
            lr=settings.lr,
            batch_size=settings.batch_size,
            rank=method.rank,
            alpha=method.alpha,
            prompt_len=method.prompt_len,
            heldout_every=settings.heldout_every,
            seed=settings.seed,
            model=args.model,
        )
    except pydantic.ValidationError as exc:
        raise SettingsError(f"bad fine-tuning settings: {first_problem(exc)}") from None


def _start_or_watch(client: ControlClient, request: FinetuneRequest) -> FinetuneJob:
    """Starts the job, or finds it running already (started before, from here or the TUI)."""
    params = FinetuneStatusParams(name=request.name)
    current = client.call(FINETUNE_STATUS, params, timeout_s=CALL_TIMEOUT_S)
    if current.state in ACTIVE:
        print(
            f"volunteer: the daemon is training {request.name} already; watching it "
            "(Ctrl-C stops it)",
            file=sys.stderr,
        )
        return current
    return client.call(FINETUNE_START, request, timeout_s=CALL_TIMEOUT_S)


def _watch(client: ControlClient, job: FinetuneJob, name: str) -> int:
    bar = ProgressBar(sys.stderr)
    params = FinetuneStatusParams(name=name)
    shown: tuple[int, bool] | None = None
    stop = threading.Event()
    is_stop_sent = False
    # Our own Ctrl-C handler, not KeyboardInterrupt: one raised inside a control call's
    # event loop can be swallowed with the call's cancellation, and the stop never sent.
    try:
        with stop_on_ctrl_c(stop):
            while True:
                # A step's figures, or the held-out loss before training (no loss yet).
                is_new = (job.step, job.loss is None) != shown
                if is_new and (job.loss is not None or job.heldout):
                    bar.show(job)
                    shown = (job.step, job.loss is None)
                if job.state not in ACTIVE:
                    break
                if stop.is_set() and not is_stop_sent:
                    bar.end()
                    job = client.call(FINETUNE_STOP, timeout_s=CALL_TIMEOUT_S)
                    is_stop_sent = True
                    continue
                time.sleep(POLL_S)
                job = client.call(FINETUNE_STATUS, params, timeout_s=CALL_TIMEOUT_S)
    except KeyboardInterrupt:  # the second Ctrl-C
        bar.end()
        print("volunteer: leaving; the daemon still stops the job", file=sys.stderr)
        return 130
    bar.end()
    return _outcome(job)


def _outcome(job: FinetuneJob) -> int:
    if job.state == "done":
        loss = "-" if job.loss is None else f"{job.loss:.4f}"
        heldout = "-" if job.heldout_loss is None else f"{job.heldout_loss:.4f}"
        print(
            f"saved adapter {job.adapter} ({job.method}, {job.step} steps, "
            f"loss {loss}, held-out {heldout}); try: volunteer chat --adapter {job.adapter}"
        )
        return 0
    if job.state == "stopped":
        print(
            f"volunteer: stopped at step {job.step}; the same command resumes it",
            file=sys.stderr,
        )
        return 130
    if job.state == "failed":
        raise VolunteerError(printable(job.error or "the job failed", max_chars=2000))
    raise VolunteerError(  # idle: the daemon no longer knows the job
        f"the daemon no longer knows the job {job.name} (did it restart?); the same "
        "command resumes it from its checkpoint, if it saved one"
    )
