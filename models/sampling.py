"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

Randomness comes only from the `torch.Generator` a `Sampler` owns, seeded by the caller,
so a seed reproduces a generation exactly.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature == 0` means greedy."""

    temperature: float = 0.7
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p; 1.0 keeps all."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the context (as in the CTRL paper)."""
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Applies `SamplingParams` to logits of a batch, one step at a time."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Picks one token per row.

        Args:
            logits: [B, vocab] scores for the next position.
            context: [B, T] token ids seen so far (prompt and generated), for the penalty.

        Returns:
            [B] chosen token ids.
        """
        logits = logits.float()
        if self.params.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, context, self.params.repetition_penalty)
        if self.params.is_greedy:
            return logits.argmax(dim=-1)
        logits = logits / self.params.temperature
        if self.params.top_k:
            logits = keep_top_k(logits, self.params.top_k)
        if self.params.top_p < 1.0:
            logits = keep_top_p(logits, self.params.top_p)
        # Drawn on the CPU, where our generator lives: one row of probabilities is cheap
        # to move, and the draw then does not depend on the device.
        probs = torch.softmax(logits, dim=-1).cpu()
        chosen = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        return chosen.to(logits.device)


def apply_repetition_penalty(
    logits: torch.Tensor, context: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Divides positive (multiplies negative) logits of tokens already in `context`."""
    seen = torch.gather(logits, 1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, context, seen)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Sets every logit below the k-th largest of its row to -inf."""
    k = min(k, logits.shape[-1])
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def keep_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the most likely tokens until their cumulative probability reaches top_p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach top_p; the first always stays.
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
