"""Fine-tuning in the daemon: one job at a time, started, watched and stopped over the
control API, so closing the CLI or the TUI that started it does not stop it.

`finetune_start` trains through the chat service's swarm client (the same model ends,
tokenizer and client, on the daemon's loop) on a thread of the job's own. `finetune_status`
reports where it is, its loss and speed series thinned to `MAX_SERIES_POINTS`;
`finetune_stop` asks it to stop at the next step boundary, which saves a checkpoint that
the same start resumes. A job that fails (malformed data, a checkpoint of other settings,
the swarm) ends "failed" with the reason, and the daemon goes on serving. `adapters` lists
the stored adapters; `AdapterChats` answers chats that name one. A job's states::

    running --(last step: adapter saved)--> done
       ├--(finetune_stop, daemon stop)--> stopping --(checkpoint saved)--> stopped
       └--(an error)--> failed
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from volunteer.control.messages import (
    ADAPTERS,
    FINETUNE_START,
    FINETUNE_STATUS,
    FINETUNE_STOP,
    MAX_SERIES_POINTS,
    AdapterRow,
    AdaptersReply,
    FinetuneJob,
    FinetuneRequest,
    FinetuneState,
    FinetuneStatusParams,
    NoParams,
    Reply,
)
from volunteer.control.server import ControlServer
from volunteer.errors import SettingsError, VolunteerError
from volunteer.finetune.adapted_chat import AdaptedChat, LoadedAdapter, load_adapter, swarm_chat
from volunteer.finetune.adapter_info import AdapterError, AdapterInfo, valid_name
from volunteer.finetune.blocks import SwarmBlocks
from volunteer.finetune.params import MethodSettings
from volunteer.finetune.store import AdapterStore
from volunteer.finetune.trainer import Progress, Stopped, Trainer, TrainSettings
from volunteer.machine.cpu_sharing import in_passing_thread, on_thread_of_its_own
from volunteer.models.errors import ModelError
from volunteer.paths import Paths
from volunteer.settings import Settings

if TYPE_CHECKING:
    from volunteer.chat.service import ChatService
    from volunteer.chat.via_swarm import SwarmChat

logger = logging.getLogger(__name__)

STOP_WAIT_S = 12.0
"""Longest a stopping daemon waits for a job to finish its step and save its checkpoint
(the runner allows a service 15 s)."""
MAX_ADAPTER_ROWS = 1000
MAX_REASON_CHARS = 300
MAX_CACHED_ADAPTERS = 8
SERIES = ("losses", "heldout", "speeds")


class _Series:
    """(step, value) points thinned to at most `limit`: every `stride`-th step is kept,
    and the stride doubles when they fill up; the first and latest points always show."""

    def __init__(self, limit: int = MAX_SERIES_POINTS) -> None:
        self.limit = limit
        self.points: list[tuple[int, float]] = []
        self.stride = 1
        self.first: tuple[int, float] | None = None
        self.last: tuple[int, float] | None = None

    def add(self, step: int, value: float) -> None:
        if not math.isfinite(value):
            return  # JSON has no nan; the chart shows the gap
        self.last = (step, value)
        self.first = self.first or self.last
        if step % self.stride:
            return
        self.points.append(self.last)
        if len(self.points) >= self.limit - 2:
            self.stride *= 2
            self.points = [p for p in self.points if p[0] % self.stride == 0]

    def view(self) -> list[tuple[int, float]]:
        points = list(self.points)
        if self.first is not None and (not points or points[0] != self.first):
            points.insert(0, self.first)
        if self.last is not None and points[-1] != self.last:
            points.append(self.last)
        return points


class _Job:
    """One run: its request, where it is (told by the trainer's thread), how it ended."""

    def __init__(self, request: FinetuneRequest) -> None:
        self.request = request
        self.state: FinetuneState = "running"
        self.stop = threading.Event()
        self.error: str | None = None
        self.adapter: str | None = None
        self._lock = threading.Lock()
        self._now = Progress(steps=request.steps)
        self._series = {key: _Series() for key in SERIES}
        self._seen = dict.fromkeys(SERIES, 0)

    @property
    def is_active(self) -> bool:
        return self.state in ("running", "stopping")

    def update(self, progress: Progress) -> None:
        """The trainer's `on_progress` (its thread): the new points of each series (all of
        a resumed run's at its first step)."""
        with self._lock:
            self._now = Progress(
                step=progress.step,
                steps=progress.steps,
                loss=progress.loss,
                heldout_loss=progress.heldout_loss,
                tokens_per_s=progress.tokens_per_s,
            )
            for key, series in self._series.items():
                points = getattr(progress, key)
                for step, value in points[self._seen[key] :]:
                    series.add(step, value)
                self._seen[key] = len(points)

    def ask_stop(self) -> None:
        with self._lock:
            if self.state == "running":
                self.state = "stopping"
        self.stop.set()

    def end(
        self, state: FinetuneState, *, error: str | None = None, adapter: str | None = None
    ) -> None:
        with self._lock:
            self.state, self.error, self.adapter = state, error, adapter

    def reply(self) -> FinetuneJob:
        with self._lock:
            now, request = self._now, self.request
            return FinetuneJob(
                name=request.name,
                state=self.state,
                method=request.method,
                data=request.data,
                step=now.step,
                steps=now.steps,
                loss=_finite(now.loss),
                heldout_loss=_finite(now.heldout_loss),
                tokens_per_s=_finite(now.tokens_per_s) or 0.0,
                error=self.error,
                adapter=self.adapter,
                **{key: series.view() for key, series in self._series.items()},
            )


class FinetuneService:
    """Runs the daemon's fine-tuning jobs (see the module).

    Args:
        settings: the daemon's settings (its model, its thread count).
        paths: where the adapters are kept.
        chat: the chat service, whose swarm chat the jobs train through.
    """

    def __init__(self, settings: Settings, paths: Paths, chat: ChatService) -> None:
        self._settings = settings
        self._store = AdapterStore.of(paths)
        self._chat = chat
        self._job: _Job | None = None
        self._task: asyncio.Task[None] | None = None

    def register_control(self, control: ControlServer) -> None:
        """Adds `finetune_start`, `finetune_status`, `finetune_stop` and `adapters`."""
        control.register(FINETUNE_START, self.start_job)
        control.register(FINETUNE_STATUS, self.job_status)
        control.register(FINETUNE_STOP, self.stop_job)
        control.register(ADAPTERS, self.adapters)

    async def start(self) -> None:
        """Nothing to start: jobs start on request."""

    async def stop(self) -> None:
        """Asks a running job to stop (it saves its checkpoint) and waits for it, bounded."""
        task, job = self._task, self._job
        if job is not None:
            job.ask_stop()
        if task is None or task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=STOP_WAIT_S)
        if not done:
            logger.warning("fine-tuning job did not stop within %g s; leaving it", STOP_WAIT_S)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def apply_settings(self, settings: Settings) -> None:
        """A new thread count applies to the next job."""
        self._settings = settings

    def status(self) -> Reply:
        """No part of `status`: `finetune_status` tells of the jobs."""
        return Reply()

    async def start_job(self, request: FinetuneRequest) -> FinetuneJob:
        """Control method: starts a job; a SettingsError if one runs or its settings are bad."""
        job = self._job
        if job is not None and job.is_active:
            raise SettingsError(
                f"a fine-tuning job ({job.request.name}, step {job.reply().step} of "
                f"{job.request.steps}) is running; stop it first or wait for it"
            )
        if request.model not in (None, self._settings.model):
            raise SettingsError(
                f"this daemon runs {self._settings.model}, not {request.model}; "
                "train that model with `volunteer finetune --local` or `--swarm MULTIADDR`"
            )
        if not Path(request.data).is_absolute():
            raise SettingsError(f"the data file must be an absolute path, not {request.data}")
        settings = _train_settings(request)
        job = self._job = _Job(request)
        self._task = asyncio.ensure_future(self._run(job, settings))
        logger.info("fine-tuning %s: %s, %d steps on %s", request.name, request.method,
                    request.steps, request.data)  # fmt: skip
        return job.reply()

    async def job_status(self, params: FinetuneStatusParams) -> FinetuneJob:
        """Control method: the current or last job (idle: none, or not the one named)."""
        job = self._job
        if job is None or params.name not in (None, job.request.name):
            return FinetuneJob(name=params.name)
        return job.reply()

    async def stop_job(self, params: NoParams) -> FinetuneJob:
        """Control method: asks the running job to stop after its step (and save)."""
        job = self._job
        if job is None:
            return FinetuneJob()
        if job.is_active:
            job.ask_stop()
            logger.info("fine-tuning %s: stop requested", job.request.name)
        return job.reply()

    async def adapters(self, params: NoParams) -> AdaptersReply:
        """Control method: the stored adapters, a damaged one with what is wrong with it."""
        rows = await asyncio.to_thread(self._store.list)
        return AdaptersReply(adapters=[_row(row) for row in rows[:MAX_ADAPTER_ROWS]])

    async def _run(self, job: _Job, settings: TrainSettings) -> None:
        try:
            base = await self._chat.swarm_chat()
            info = await on_thread_of_its_own(self._train, job, settings, base)
        except Stopped:
            job.end("stopped")
        except asyncio.CancelledError:
            job.end("stopped")
            raise
        except (VolunteerError, ModelError) as exc:
            job.end("failed", error=str(exc))
        except Exception as exc:  # a job's bug must not take the daemon down: say it
            logger.exception("fine-tuning %s failed", job.request.name)
            job.end("failed", error=f"{type(exc).__name__}: {exc}")
        else:
            job.end("done", adapter=info.name)
        logger.info("fine-tuning %s: %s%s", job.request.name, job.state,
                    f" ({job.error})" if job.error else "")  # fmt: skip

    def _train(self, job: _Job, settings: TrainSettings, base: SwarmChat) -> AdapterInfo:
        # OpenMP keeps a count per thread, and this thread is the job's own.
        torch.set_num_threads(self._settings.thread_count)
        trainer = Trainer(
            settings,
            ends=base.ends,
            tokenizer=base.tokenizer,
            config=base.config,
            model=base.client.model,
            blocks=SwarmBlocks(base.client, base.loop),
            store=self._store,
            on_progress=job.update,
            should_stop=job.stop.is_set,
        )
        return trainer.run()


def adapter_names(paths: Paths, model: str) -> list[str]:
    """The stored adapters trained for `model` (the `model` setting), by name."""
    stored = AdapterStore.of(paths).list()
    return sorted(a.name for a in stored if isinstance(a, AdapterInfo) and a.model == model)


class AdapterChats:
    """Chats with stored adapters on the daemon's swarm chat (`ChatService`'s
    `AdaptedChats`). An adapter is loaded once, and again when its files change."""

    def __init__(self, paths: Paths) -> None:
        self._store = AdapterStore.of(paths)
        self._loaded: dict[str, tuple[tuple[int, ...], LoadedAdapter]] = {}

    async def chat_for(self, name: str, base: SwarmChat) -> AdaptedChat:
        """A chat with adapter `name`, its blocks in the swarm; AdapterError if it is
        missing, damaged or trained for another model."""
        stamp = self._stamp(valid_name(name))
        cached = self._loaded.get(name)
        if cached is None or cached[0] != stamp:
            loaded = await in_passing_thread(
                load_adapter, self._store, name, config=base.config, model=base.client.model
            )
            self._loaded.pop(name, None)
            self._loaded[name] = cached = (stamp, loaded)
            while len(self._loaded) > MAX_CACHED_ADAPTERS:
                self._loaded.pop(next(iter(self._loaded)))
        blocks = SwarmBlocks(base.client, base.loop)
        return swarm_chat(base.ends, blocks, base.tokenizer, base.config, cached[1])

    def _stamp(self, name: str) -> tuple[int, ...]:
        # A saved adapter replaces its folder by a rename: new inodes, new times.
        stamp: list[int] = []
        for file_name in ("adapter.json", "adapter.safetensors"):
            try:
                found = os.stat(self._store.root / name / file_name)
            except FileNotFoundError:
                raise AdapterError(
                    f"no adapter named {name} (see `volunteer adapters list`)"
                ) from None
            stamp += [found.st_ino, found.st_mtime_ns, found.st_size]
        return tuple(stamp)


def _train_settings(request: FinetuneRequest) -> TrainSettings:
    """The request as the trainer's settings (a SettingsError names a bad value)."""
    method = MethodSettings(
        request.method, prompt_len=request.prompt_len, rank=request.rank, alpha=request.alpha
    )
    return TrainSettings(
        data=Path(request.data),
        name=request.name,
        method=method,
        steps=request.steps,
        lr=request.lr,
        batch_size=request.batch_size,
        heldout_every=request.heldout_every,
        seed=request.seed,
    )


def _row(row: Any) -> AdapterRow:
    if isinstance(row, AdapterInfo):
        return AdapterRow(
            name=row.name, method=row.method, steps=row.steps, heldout_loss=row.heldout_loss
        )
    return AdapterRow(name=row.name, is_broken=True, reason=row.reason[:MAX_REASON_CHARS])


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
