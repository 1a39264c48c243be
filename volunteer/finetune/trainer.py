"""The fine-tuning loop: data in, a named adapter out, resumable at any step boundary.

The same loop trains locally and through the swarm (`volunteer.finetune.blocks`). Every
trainable tensor and the optimizer's state live here. The batch order follows from the
seed and the step alone, so a run resumed from its checkpoint sees exactly the batches it
would have seen; a stop request (Ctrl-C, the TUI's stop) is honoured between steps and
saves that checkpoint first, so nothing trained is lost.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from volunteer.errors import SettingsError
from volunteer.finetune.adapter_info import AdapterInfo
from volunteer.finetune.blocks import Blocks, causal_loss
from volunteer.finetune.data import Batch, Example, batches, load_examples, split_heldout
from volunteer.finetune.params import AdapterParams, MethodSettings
from volunteer.finetune.store import AdapterStore
from volunteer.models.config import ModelConfig
from volunteer.models.model import ModelEnds
from volunteer.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_LR = {"ptune": 3e-2, "deep_ptune": 1e-2, "lora": 1e-3}
"""Learning rates that suit each method (soft prompts want larger steps than LoRA)."""
MAX_STEPS = 1_000_000
MAX_CALL_POSITIONS = 512
"""Positions (rows times prompt and tokens) per forward/backward call: servers refuse a
backward of more than their `max_backward_tokens`, 512 by default. A larger batch runs
as several calls whose gradients add up to the batch's."""


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One fine-tuning run."""

    data: Path
    name: str
    method: MethodSettings = dataclasses.field(default_factory=MethodSettings)
    steps: int = 100
    lr: float | None = None
    """None: `DEFAULT_LR` of the method."""
    batch_size: int = 8
    heldout_every: int = 10
    """Held-out loss every this many steps (and at the last)."""
    heldout_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise SettingsError(f"--steps must be 1..{MAX_STEPS}, got {self.steps}")
        if not 1 <= self.batch_size <= 4096:
            raise SettingsError(f"--batch-size must be 1..4096, got {self.batch_size}")
        if self.lr is not None and not (math.isfinite(self.lr) and 0 < self.lr <= 10):
            raise SettingsError(f"--lr must be a positive number up to 10, got {self.lr}")
        if self.heldout_every < 1:
            raise SettingsError("held-out evaluation needs a period of at least one step")

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.method.method] if self.lr is None else self.lr


@dataclasses.dataclass
class Progress:
    """Where a run is: what the CLI's bar and the TUI's chart show."""

    step: int = 0
    steps: int = 0
    loss: float | None = None
    heldout_loss: float | None = None
    tokens_per_s: float = 0.0
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    heldout: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    speeds: list[tuple[int, float]] = dataclasses.field(default_factory=list)


class Stopped(Exception):
    """A run stopped on request, its checkpoint saved (run it again to resume)."""


class Trainer:
    """Trains one adapter (see the module).

    Args:
        ends, tokenizer, config, model: the model's ends here, and its name.
        blocks: where its blocks run.
        store: where the adapter and the checkpoint go.
        on_progress: told after every step.
        should_stop: asked between steps.
    """

    def __init__(
        self,
        settings: TrainSettings,
        *,
        ends: ModelEnds,
        tokenizer: Tokenizer,
        config: ModelConfig,
        model: str,
        blocks: Blocks,
        store: AdapterStore,
        on_progress: Callable[[Progress], None] = lambda progress: None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.ends = ends.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config
        self.model = model
        self.blocks = blocks
        self.store = store
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.progress = Progress(steps=settings.steps)
        method = settings.method
        embed_std = float(ends.embed_tokens.weight.std())
        self.params = AdapterParams(method, config, embed_std=embed_std, seed=settings.seed)
        self.optimizer = torch.optim.AdamW(
            self.params.parameters(), lr=settings.learning_rate, weight_decay=0.0
        )

    def load_data(self) -> tuple[list[Example], list[Example]]:
        """The training and held-out examples (a `DataError` before any training)."""
        max_length = self.config.max_position_embeddings - self.settings.method.prefix_len
        examples = load_examples(self.settings.data, self.tokenizer, max_length=max_length)
        return split_heldout(
            examples, fraction=self.settings.heldout_fraction, seed=self.settings.seed
        )

    def run(self) -> AdapterInfo:
        """Trains to the last step (resuming a checkpoint of this name, if any) and saves
        the adapter.

        Raises:
            DataError: the data is malformed (nothing trained, nothing written).
            Stopped: asked to stop; the checkpoint is saved.
        """
        train, heldout = self.load_data()
        self._resume()
        pad_id = self.tokenizer.eos_token_id or 0
        progress = self.progress
        if heldout and not progress.heldout:
            # Where the base model starts: what the run's held-out losses are measured by.
            progress.heldout.append((0, self.heldout_loss(heldout, pad_id)))
            self.on_progress(progress)
        while progress.step < self.settings.steps:
            if self.should_stop():
                self._checkpoint()
                raise Stopped(f"stopped at step {progress.step}; the same command resumes it")
            batch = _batch_at(train, progress.step, self.settings, pad_id)
            began = time.perf_counter()
            loss = self._step(batch)
            progress.step += 1
            progress.loss = loss
            progress.tokens_per_s = batch.tokens / max(time.perf_counter() - began, 1e-9)
            progress.losses.append((progress.step, loss))
            progress.speeds.append((progress.step, progress.tokens_per_s))
            is_last = progress.step == self.settings.steps
            if heldout and (is_last or progress.step % self.settings.heldout_every == 0):
                progress.heldout_loss = self.heldout_loss(heldout, pad_id)
                progress.heldout.append((progress.step, progress.heldout_loss))
            self.on_progress(progress)
        info = self._info()
        self.store.save(info, self.params.named_tensors(), replace=True)
        self.store.checkpoint_delete(self.settings.name)
        return info

    def heldout_loss(self, examples: list[Example], pad_id: int) -> float:
        """The mean loss per target token over `examples`, without gradients."""
        total, count = 0.0, 0
        with torch.no_grad():
            size = self.settings.batch_size
            for batch in batches(examples, size, pad_id=pad_id, seed=0, epoch=0):
                loss, tokens = self._batch_loss(batch, learn=False)
                total += loss * tokens
                count += tokens
        return total / max(count, 1)

    def _step(self, batch: Batch) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self._batch_loss(batch, learn=True)
        self.optimizer.step()
        return loss

    def _batch_loss(self, batch: Batch, *, learn: bool) -> tuple[float, int]:
        """The batch's mean loss per target token, run as calls of at most
        `MAX_CALL_POSITIONS` positions each; with `learn`, their gradients, weighted by
        their share of the targets, add up to the whole batch's."""
        prefix = self.settings.method.prefix_len
        rows = max(1, MAX_CALL_POSITIONS // (batch.input_ids.shape[1] + prefix))
        total = int(batch.targets[:, 1:].sum())
        summed = 0.0
        for first in range(0, batch.input_ids.shape[0], rows):
            input_ids = batch.input_ids[first : first + rows]
            targets = batch.targets[first : first + rows]
            if not targets[:, 1:].any():
                continue
            loss, count = causal_loss(
                self.ends,
                self.params.prompt,
                self.params.span_adapter(),
                self.blocks,
                input_ids,
                targets,
            )
            if learn:
                (loss * (count / total)).backward()
            summed += float(loss.detach()) * count
        return summed / max(total, 1), total

    def _info(self) -> AdapterInfo:
        method = self.settings.method
        return AdapterInfo(
            name=self.settings.name,
            method=method.method,
            model=self.model,
            num_layers=self.config.num_layers,
            hidden_size=self.config.hidden_size,
            prompt_len=method.prefix_len,
            rank=method.rank if method.method == "lora" else 0,
            alpha=method.alpha if method.method == "lora" else 0.0,
            targets=method.targets if method.method == "lora" else (),
            steps=self.progress.step,
            train_loss=self.progress.loss,
            heldout_loss=self.progress.heldout_loss,
            data=self.settings.data.name,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        )

    def _checkpoint(self) -> None:
        optimizer: dict[str, torch.Tensor] = {}
        names = {id(p): name for name, p in self.params.named_parameters()}
        for param, state in self.optimizer.state.items():
            for key, value in state.items():
                optimizer[f"{names[id(param)]}/{key}"] = torch.as_tensor(value).detach()
        progress = dataclasses.asdict(self.progress)
        progress["settings"] = _settings_key(self.settings)
        self.store.checkpoint_save(
            self.settings.name, self._info(), self.params.named_tensors(), optimizer, progress
        )

    def _resume(self) -> None:
        found = self.store.checkpoint_load(self.settings.name)
        if found is None:
            return
        info, tensors, optimizer, progress = found
        if progress.get("settings") != _settings_key(self.settings) or info.model != self.model:
            raise SettingsError(
                f"a checkpoint of {self.settings.name} was saved by a run with other settings "
                "or another model; resume it with those, or pick another --name "
                f"(`volunteer adapters delete {self.settings.name}` drops it)"
            )
        self.params.load_named(tensors)
        params = dict(self.params.named_parameters())
        for key, value in optimizer.items():
            name, _, field = key.rpartition("/")
            self.optimizer.state[params[name]][field] = value.clone()
        self.progress = Progress(
            step=int(progress["step"]),
            steps=self.settings.steps,
            loss=progress.get("loss"),
            heldout_loss=progress.get("heldout_loss"),
            losses=[tuple(x) for x in progress.get("losses", [])],
            heldout=[tuple(x) for x in progress.get("heldout", [])],
            speeds=[tuple(x) for x in progress.get("speeds", [])],
        )
        logger.info("resuming %s at step %d", self.settings.name, self.progress.step)


def _batch_at(examples: list[Example], step: int, settings: TrainSettings, pad_id: int) -> Batch:
    """The batch of a step: epochs of shuffled batches, in an order set by the seed alone."""
    per_epoch = math.ceil(len(examples) / settings.batch_size)
    epoch, index = divmod(step, per_epoch)
    epoch_batches = batches(
        examples, settings.batch_size, pad_id=pad_id, seed=settings.seed, epoch=epoch
    )
    for number, batch in enumerate(epoch_batches):
        if number == index:
            return batch
    raise AssertionError("a step past its epoch's batches")


def _settings_key(settings: TrainSettings) -> dict[str, object]:
    """What a checkpoint must share with the run that resumes it (the step count may grow)."""
    method = dataclasses.asdict(settings.method)
    method["targets"] = list(method["targets"])
    return {
        "data": str(settings.data.resolve()),
        "method": method,
        "lr": settings.learning_rate,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
    }
