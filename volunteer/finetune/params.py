"""The trainable parameters of each fine-tuning method, held by the client.

- `ptune`: P prompt embeddings put in front of the tokens, before the first block.
- `deep_ptune`: the same, plus a [P, H] prompt per block added to the first P positions
  of that block's input (Petals' deep prompt tuning); the per-block prompts start at zero,
  so training starts from the plain soft prompt.
- `lora`: low-rank adapters next to every block's projections
  (`volunteer.models.adapters`); B starts at zero, so training starts from the base model.

Everything but the `ptune` prompt travels to the servers with each call, as a
`SpanAdapter` for the call's blocks: servers keep none of it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from volunteer.errors import SettingsError
from volunteer.models.adapters import LORA_TARGETS, AdapterLayout, SpanAdapter, lora_dims
from volunteer.models.config import ModelConfig

METHODS = ("ptune", "deep_ptune", "lora")
MAX_PROMPT_LEN = 256
MAX_RANK = 256


@dataclasses.dataclass(frozen=True)
class MethodSettings:
    """Which method, and its sizes."""

    method: str = "ptune"
    prompt_len: int = 16
    """P: prompt positions (ptune, deep_ptune)."""
    rank: int = 8
    """r (lora)."""
    alpha: float = 16.0
    """LoRA's scale is alpha / r."""
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SettingsError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.uses_prompt and not 1 <= self.prompt_len <= MAX_PROMPT_LEN:
            raise SettingsError(f"--prompt-len must be 1..{MAX_PROMPT_LEN}, got {self.prompt_len}")
        if self.method == "lora":
            if not 1 <= self.rank <= MAX_RANK:
                raise SettingsError(f"--rank must be 1..{MAX_RANK}, got {self.rank}")
            if not math.isfinite(self.alpha) or self.alpha <= 0:
                raise SettingsError(f"--alpha must be a positive number, got {self.alpha}")
            if not self.targets or any(t not in LORA_TARGETS for t in self.targets):
                raise SettingsError(f"LoRA targets must be among {', '.join(LORA_TARGETS)}")

    @property
    def uses_prompt(self) -> bool:
        return self.method in ("ptune", "deep_ptune")

    @property
    def prefix_len(self) -> int:
        """Positions put in front of the tokens."""
        return self.prompt_len if self.uses_prompt else 0

    def layout(self) -> AdapterLayout | None:
        """What the servers apply (None: nothing, as for `ptune`)."""
        if self.method == "deep_ptune":
            return AdapterLayout(prompt_len=self.prompt_len)
        if self.method == "lora":
            return AdapterLayout(rank=self.rank, targets=self.targets, scale=self.alpha / self.rank)
        return None


class AdapterParams(nn.Module):
    """A method's trainable tensors for one model (see the module)."""

    def __init__(
        self, settings: MethodSettings, config: ModelConfig, *, embed_std: float, seed: int = 0
    ) -> None:
        super().__init__()
        self.settings = settings
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        layers, hidden = config.num_layers, config.hidden_size
        self.prompt: nn.Parameter | None = None
        self.deep_prompts: nn.Parameter | None = None
        self.lora = nn.ParameterDict()
        if settings.uses_prompt:
            # At the scale of real token embeddings, so the first block sees the kind of
            # input it was trained on.
            start = torch.randn(settings.prompt_len, hidden, generator=generator) * embed_std
            self.prompt = nn.Parameter(start)
        if settings.method == "deep_ptune":
            self.deep_prompts = nn.Parameter(torch.zeros(layers, settings.prompt_len, hidden))
        if settings.method == "lora":
            for target in settings.targets:
                fan_in, fan_out = lora_dims(config, target)
                a = torch.randn(layers, settings.rank, fan_in, generator=generator)
                self.lora[f"{target}_a"] = nn.Parameter(a / math.sqrt(fan_in))
                self.lora[f"{target}_b"] = nn.Parameter(torch.zeros(layers, fan_out, settings.rank))

    def span_tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors servers apply, stacked over every block, in `SpanAdapter` order."""
        if self.deep_prompts is not None:
            return (self.deep_prompts,)
        tensors: list[torch.Tensor] = []
        for target in self.settings.targets if self.settings.method == "lora" else ():
            tensors += [self.lora[f"{target}_a"], self.lora[f"{target}_b"]]
        return tuple(tensors)

    def span_adapter(self, tensors: tuple[torch.Tensor, ...] | None = None) -> SpanAdapter | None:
        """The adapter of every block (None for `ptune`), of these tensors (default: the
        parameters themselves)."""
        layout = self.settings.layout()
        if layout is None:
            return None
        return SpanAdapter(layout, self.span_tensors() if tensors is None else tensors)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under the names an adapter file keeps them by
        (`volunteer.finetune.store`)."""
        named: dict[str, torch.Tensor] = {}
        if self.prompt is not None:
            named["prompt"] = self.prompt.detach()
        if self.deep_prompts is not None:
            named["deep_prompts"] = self.deep_prompts.detach()
        for key, value in self.lora.items():
            target, _, half = key.rpartition("_")
            named[f"lora.{target}.{half}"] = value.detach()
        return named

    def load_named(self, tensors: dict[str, torch.Tensor]) -> None:
        """Sets the parameters from `named_tensors`-style tensors (checked by the store)."""
        mine = self.named_tensors()
        if set(tensors) != set(mine):
            raise SettingsError(f"adapter tensors {sorted(tensors)} are not {sorted(mine)}")
        with torch.no_grad():
            for name, value in tensors.items():
                mine[name].copy_(value)
