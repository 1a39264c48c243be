"""A stage peer's share of training: forward and backward of the microbatches routed to
it through its blocks, their parameter gradients summed until the global step, then the
step itself with the gradient its stage agreed on.

SWARM routes each microbatch through one peer of each stage, whichever is expected to
finish first; so within a global step every peer of a stage has seen some of the
microbatches. Each reports its mean gradient per sequence and how many sequences it
saw; the stage aggregates those (`aggregate`: the sample-weighted mean, which is
exactly the whole batch's gradient, or CenteredClip with the same weights), and every
peer applies the same aggregate with the same optimizer, so the peers of a stage keep
identical weights without ever sending them.

Backward recomputes the forward from the saved input (activation rematerialization, as
SWARM and Petals do): a peer keeps one input per microbatch in flight, not every
activation of its blocks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
import torch.nn.functional as F

from volunteer.models.adapters import LORA_TARGETS, AdapterLayout, SpanAdapter, lora_dims
from volunteer.models.config import ModelConfig
from volunteer.models.model import BlockSpan, ModelEnds
from volunteer.training.centered_clip import centered_clip
from volunteer.training.job import Aggregation, Optimizer

MAX_IN_FLIGHT = 1024
"""Microbatches a peer keeps inputs of while their backward has not come (a bound on
what a client that never sends backward can make it hold)."""


class StageError(ValueError):
    """A microbatch the stage cannot take (unknown, duplicate, too many, wrong shape)."""


class StageTrainer:
    """Trains the blocks of one span as one peer of a stage (module doc)."""

    def __init__(
        self, span: BlockSpan, optimizer: Optimizer, *, lora_rank: int = 0, seed: int = 0
    ) -> None:
        """`lora_rank` > 0 trains LoRA adapters of the blocks (`stage_lora`, from `seed`)
        and leaves their weights frozen; 0 trains the blocks themselves."""
        self.span = span.train()
        self._adapter: SpanAdapter | None = None
        # `param_names` name `params` as the adapter store does (`lora.<target>.<a|b>`,
        # stacked over the stage's blocks) or as the span does (`blocks.<i>.<name>`).
        if lora_rank:
            span.requires_grad_(False)
            blocks = range(span.start, span.end)
            self._adapter = stage_lora(span.config, lora_rank, blocks, seed=seed)
            self.params = list(self._adapter.tensors)
            self.param_names = [f"lora.{t}.{part}" for t in LORA_TARGETS for part in "ab"]
        else:
            trained = [(n, p) for n, p in span.named_parameters() if p.requires_grad]
            self.params = [param for _, param in trained]
            self.param_names = [name for name, _ in trained]
        self._sums = [torch.zeros_like(param, dtype=torch.float64) for param in self.params]
        self._inputs: dict[str, torch.Tensor] = {}
        self.samples = 0
        """Sequences whose backward this peer ran since the last step."""
        self.steps = 0
        self._optimizer = _make_optimizer(self.params, optimizer)

    def forward(self, key: str, hidden: torch.Tensor) -> torch.Tensor:
        """The microbatch `key`'s hidden states [B, S, H] through the blocks; the input is
        kept for its backward."""
        if key in self._inputs:
            raise StageError(f"microbatch {key!r} is already in flight here")
        if len(self._inputs) >= MAX_IN_FLIGHT:
            raise StageError(f"{MAX_IN_FLIGHT} microbatches are in flight here already")
        self._check(hidden)
        with torch.no_grad():
            output = self._blocks(hidden)
        self._inputs[key] = hidden.detach()
        return output

    def backward(self, key: str, grad_output: torch.Tensor) -> torch.Tensor:
        """The gradient of the loss w.r.t. the microbatch's input, given the gradient
        w.r.t. its output; the blocks' parameter gradients are added to this step's sum."""
        hidden = self._inputs.get(key)
        if hidden is None:
            raise StageError(f"no forward of microbatch {key!r} is waiting for backward here")
        if grad_output.shape != hidden.shape:
            raise StageError(
                f"gradient {tuple(grad_output.shape)} does not match the output "
                f"{tuple(hidden.shape)} of microbatch {key!r}"
            )
        del self._inputs[key]
        leaf = hidden.clone().requires_grad_(True)
        with torch.enable_grad():
            output = self._blocks(leaf)
            grads = torch.autograd.grad(output, [leaf, *self.params], grad_output)
        for total, grad in zip(self._sums, grads[1:], strict=True):
            total += grad
        self.samples += hidden.shape[0]
        return grads[0]

    def _blocks(self, hidden: torch.Tensor) -> torch.Tensor:
        """The span's forward, with the stage's LoRA adapters if it trains them."""
        return self.span(hidden, adapter=self._adapter)

    def loss_backward(
        self, key: str, hidden: torch.Tensor, labels: torch.Tensor, ends: ModelEnds
    ) -> tuple[float, torch.Tensor]:
        """The last stage's whole share of a microbatch: forward, the sum of its
        sequences' losses against `labels` [B, S], and backward; the loss sum and the
        gradient w.r.t. the input."""
        self._check_labels(hidden, labels)
        output = self.forward(key, hidden)
        loss, grad_output = loss_gradient(ends, output, labels)
        return loss, self.backward(key, grad_output)

    def output_gradient(
        self, hidden: torch.Tensor, labels: torch.Tensor, ends: ModelEnds
    ) -> tuple[float, torch.Tensor]:
        """The last stage's loss sum and gradient w.r.t. its output for a microbatch and
        its targets, with the current weights (what a validator recomputes a last-stage
        peer's pass from)."""
        self._check_labels(hidden, labels)
        with torch.no_grad():
            output = self._blocks(hidden)
        return loss_gradient(ends, output, labels)

    def recompute(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> Recomputed:
        """What microbatches (input, gradient w.r.t. the output) give with the current
        weights, touching nothing of this step's own sums: the mean gradient per
        sequence, and each one's output and gradient w.r.t. its input. What a validator
        compares a peer's share and answers with."""
        sums = [torch.zeros_like(param, dtype=torch.float64) for param in self.params]
        outputs, input_grads = [], []
        samples = 0
        for hidden, grad_output in items:
            self._check(hidden)
            if grad_output.shape != hidden.shape:
                raise StageError("each gradient must match its microbatch's output")
            leaf = hidden.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                output = self._blocks(leaf)
                grads = torch.autograd.grad(output, [leaf, *self.params], grad_output)
            for total, grad in zip(sums, grads[1:], strict=True):
                total += grad
            outputs.append(output.detach())
            input_grads.append(grads[0])
            samples += hidden.shape[0]
        if not samples:
            raise StageError("nothing to recompute")
        share = torch.cat([total.flatten() for total in sums]) / samples
        return Recomputed(share, outputs, input_grads)

    def gradient(self) -> torch.Tensor:
        """This step's mean gradient per sequence, flattened (float64)."""
        if not self.samples:
            raise StageError("no microbatch came back through this peer since the last step")
        return torch.cat([total.flatten() for total in self._sums]) / self.samples

    def step(self, gradient: torch.Tensor) -> None:
        """Applies the stage's aggregated gradient (shaped like `gradient()`) and starts
        the next step's sums."""
        size = sum(param.numel() for param in self.params)
        if gradient.shape != (size,) or not bool(torch.isfinite(gradient).all()):
            raise StageError(f"an aggregated gradient must be {size} finite numbers")
        offset = 0
        for param in self.params:
            part = gradient[offset : offset + param.numel()]
            param.grad = part.view_as(param).to(param.dtype).clone()
            offset += param.numel()
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._next_step()

    def skip_step(self) -> None:
        """Drops this step's sums without changing the weights (the stage's step was
        taken without this peer, which will load the stage's state instead)."""
        self._next_step()

    def clear(self) -> None:
        """Forgets this step's sums and inputs (their gradients came from a liar)."""
        for total in self._sums:
            total.zero_()
        self.samples = 0
        self._inputs.clear()

    def _next_step(self) -> None:
        self.clear()  # also drops the microbatches abandoned in this step
        self.steps += 1

    def state(self) -> list[torch.Tensor]:
        """The stage's weights and optimizer state, as `load_state` takes them: each
        parameter, then each parameter's optimizer tensors in name order."""
        tensors = [param.detach().clone() for param in self.params]
        for param in self.params:
            held = self._optimizer.state.get(param, {})
            tensors.extend(_as_tensor(held[name]) for name in sorted(held))
        return tensors

    def load_state(self, tensors: list[torch.Tensor], steps: int) -> None:
        """Takes another peer's `state()` of the same stage at step `steps`.

        Raises:
            StageError: tensors that are not that stage's state.
        """
        count = len(self.params)
        if len(tensors) < count or (len(tensors) - count) % count:
            raise StageError(f"a stage state is {count} parameters and their optimizer state")
        per_param = (len(tensors) - count) // count
        names = _OPTIMIZER_STATE[type(self._optimizer).__name__][:per_param]
        if len(names) != per_param:
            raise StageError("optimizer state of another optimizer")
        for param, value in zip(self.params, tensors, strict=False):
            if value.shape != param.shape:
                raise StageError(
                    f"a parameter of shape {tuple(value.shape)} where {tuple(param.shape)} is"
                )
        with torch.no_grad():
            for param, value in zip(self.params, tensors, strict=False):
                param.copy_(value)
        self.span.forget_weights()
        for index, param in enumerate(self.params):
            start = count + index * per_param
            values = tensors[start : start + per_param]
            if any(v.numel() != 1 and v.shape != param.shape for v in values):
                raise StageError("optimizer state that does not fit its parameter")
            self._optimizer.state[param] = {
                name: value.to(param.dtype)
                if value.numel() != 1
                else value.to(torch.float32).reshape(())
                for name, value in zip(sorted(names), values, strict=True)
            }
        for total in self._sums:
            total.zero_()
        self.samples = 0
        self.steps = steps
        self._inputs.clear()

    def _check_labels(self, hidden: torch.Tensor, labels: torch.Tensor) -> None:
        vocab = self.span.config.vocab_size
        if labels.dtype != torch.int64 or labels.shape != hidden.shape[:2]:
            raise StageError("labels must be int64 [batch, seq] like the hidden states")
        if bool(((labels >= vocab) | (labels < -100)).any()):
            raise StageError(f"labels must be token ids below {vocab} (or -100: ignored)")

    def _check(self, hidden: torch.Tensor) -> None:
        width = self.span.config.hidden_size
        if hidden.dim() != 3 or hidden.shape[-1] != width or not hidden.is_floating_point():
            raise StageError(f"hidden states must be float [batch, seq, {width}]")
        if not bool(torch.isfinite(hidden).all()):
            raise StageError("hidden states must be finite")


LORA_SCALE = 2.0
"""LoRA's alpha / r (alpha = 2r, the usual choice)."""


def stage_lora(config: ModelConfig, rank: int, blocks: range, *, seed: int) -> SpanAdapter:
    """LoRA adapters (every target) of `blocks`, as trainable parameters: A random and
    scaled by its fan-in, B zero, so training starts from the frozen model. Each block's
    tensors come from `seed` and the block's index alone: every peer of a stage, and one
    process holding every block, starts from the same ones."""
    layout = AdapterLayout(rank=rank, targets=LORA_TARGETS, scale=LORA_SCALE)
    tensors = []
    for target in LORA_TARGETS:
        fan_in, fan_out = lora_dims(config, target)
        a = []
        for block in blocks:
            name = f"{seed}.{block}.{target}".encode()
            generator = torch.Generator().manual_seed(
                int.from_bytes(hashlib.sha256(name).digest()[:8], "big") >> 1
            )
            a.append(torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in))
        tensors.append(torch.nn.Parameter(torch.stack(a)))
        tensors.append(torch.nn.Parameter(torch.zeros(len(blocks), fan_out, rank)))
    return SpanAdapter(layout, tuple(tensors))


@dataclasses.dataclass(frozen=True)
class Recomputed:
    """A validator's recomputation of a peer's microbatches (`StageTrainer.recompute`)."""

    share: torch.Tensor
    outputs: list[torch.Tensor]
    input_grads: list[torch.Tensor]


def sequence_losses(ends: ModelEnds, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean next-token loss (positions labelled -100 left out)."""
    logits = ends.logits(hidden)
    flat = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), reduction="none", ignore_index=-100
    ).view(labels.shape)
    counted = (labels != -100).sum(1).clamp(min=1)
    return flat.sum(1) / counted


def loss_gradient(
    ends: ModelEnds, output: torch.Tensor, labels: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """The sum of the sequences' losses and its gradient w.r.t. the blocks' output (the
    stages divide by how many sequences they saw)."""
    leaf = output.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = sequence_losses(ends, leaf, labels).sum()
        (grad,) = torch.autograd.grad(loss, [leaf])
    return float(loss.detach()), grad


def aggregate(
    gradients: list[torch.Tensor], samples: list[int], aggregation: Aggregation
) -> torch.Tensor:
    """A stage's gradient from its peers' mean gradients and how many sequences each
    saw: their sample-weighted mean, or CenteredClip with those weights."""
    if not gradients or len(gradients) != len(samples) or min(samples) < 1:
        raise ValueError("need each peer's gradient and its number of sequences (>= 1)")
    stacked = torch.stack(gradients)
    weights = torch.tensor(samples, dtype=torch.float64)
    if aggregation.kind == "mean":
        if not bool(torch.isfinite(stacked).all()):
            raise ValueError("a gradient has values that are not finite")
        return (weights.unsqueeze(1) * stacked.to(torch.float64)).sum(0) / weights.sum()
    return centered_clip(
        stacked, tau=aggregation.tau, weights=weights, iterations=aggregation.iterations
    ).center


_OPTIMIZER_STATE = {"AdamW": ("exp_avg", "exp_avg_sq", "step"), "SGD": ("momentum_buffer",)}
"""The tensors torch's optimizers keep per parameter (sorted when sent)."""


def _as_tensor(value: object) -> torch.Tensor:
    return value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value)


def _make_optimizer(params: list[torch.nn.Parameter], settings: Optimizer) -> torch.optim.Optimizer:
    if settings.name == "adamw":
        return torch.optim.AdamW(
            params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )
    return torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
