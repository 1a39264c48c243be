"""What an adapter is, apart from where it is kept: its settings and the tensors they imply.

An `AdapterInfo` (an adapter's `adapter.json`) fixes the name and shape of every tensor:
`prompt` [P, H] (ptune, deep_ptune), `deep_prompts` [L, P, H] (deep_ptune), and per
target t `lora.<t>.a` [L, r, in_t] and `lora.<t>.b` [L, out_t, r] (lora; widths from
`volunteer.models.adapters.lora_dims`, which only the model's config fixes).

    VolunteerError
    └── AdapterError   a bad name, a missing or damaged adapter, a model mismatch
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import torch

from volunteer.errors import VolunteerError
from volunteer.finetune.params import METHODS
from volunteer.models.adapters import LORA_TARGETS, lora_dims
from volunteer.models.config import ModelConfig

FORMAT_VERSION = 1
MAX_DIM = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TORCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AdapterError(VolunteerError):
    """An adapter name is invalid, or an adapter is missing, damaged or incompatible."""


def valid_name(name: object) -> str:
    """`name` if it matches `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` (so no name climbs out of the
    store); AdapterError otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1 to 64 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """An adapter's settings and results, as `adapter.json` stores them (checked on build)."""

    name: str
    method: str  # one of METHODS
    model: str  # the model's name as volunteer knows it (the `model` setting)
    num_layers: int
    hidden_size: int
    prompt_len: int  # soft-prompt tokens (ptune, deep_ptune)
    rank: int  # LoRA rank
    alpha: float  # LoRA updates are scaled by alpha / rank
    targets: tuple[str, ...]  # LoRA targets from LORA_TARGETS; empty for the other methods
    steps: int
    train_loss: float | None
    heldout_loss: float | None
    data: str  # what it was trained on (a file name or a description)
    created: str  # ISO 8601 time in UTC: datetime.now(timezone.utc).isoformat()

    def __post_init__(self) -> None:
        _check_info(self)

    def to_json(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **dataclasses.asdict(self), "targets": [*self.targets]}

    @classmethod
    def from_json(cls, raw: object) -> AdapterInfo:
        """Builds an info from `to_json`'s dict (unknown keys ignored); AdapterError if bad."""
        if not isinstance(raw, Mapping):
            raise AdapterError("its settings are not a JSON object")
        if raw.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise AdapterError(f"its format version {raw.get('version')!r} is not supported")
        try:
            values = {f.name: raw[f.name] for f in dataclasses.fields(cls)}
        except KeyError as exc:
            raise AdapterError(f"its settings lack {exc.args[0]}") from None
        if isinstance(values["targets"], list):  # anything else fails the check
            values["targets"] = tuple(values["targets"])
        return cls(**values)


def _check_info(info: AdapterInfo) -> None:
    valid_name(info.name)
    _require(info.method in METHODS, f"method {info.method!r} is not one of {METHODS}")
    for key in ("model", "data", "created"):
        value = getattr(info, key)
        _require(isinstance(value, str) and value.isprintable(), f"{key} is not printable text")
    _require(0 < len(info.model) <= 1024 and len(info.data) <= 4096, "model or data is too long")
    for key, low in (("num_layers", 1), ("hidden_size", 1), ("prompt_len", 0), ("rank", 0)):
        value = getattr(info, key)
        _require(_is_int(value) and low <= value <= MAX_DIM, f"{key} {value!r} is out of range")
    _require(_is_int(info.steps) and info.steps >= 0, f"steps {info.steps!r} is out of range")
    _require(_is_finite(info.alpha) and info.alpha >= 0, f"alpha {info.alpha!r} is out of range")
    for key in ("train_loss", "heldout_loss"):
        value = getattr(info, key)
        _require(value is None or _is_finite(value), f"{key} {value!r} is not a finite number")
    targets = info.targets
    is_known = isinstance(targets, tuple) and all(t in LORA_TARGETS for t in targets)
    _require(is_known and len(set(targets)) == len(targets), f"bad targets {targets!r}")
    if info.method == "lora":
        _require(info.rank >= 1 and bool(targets), "lora needs rank >= 1 and targets")
    else:
        _require(info.prompt_len >= 1 and not targets, f"{info.method} needs prompt_len >= 1")
    with contextlib.suppress(ValueError):
        if datetime.fromisoformat(info.created.replace("Z", "+00:00")).utcoffset() == timedelta(0):
            return
    _require(False, f"created {info.created!r} is not an ISO time in UTC")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise AdapterError(f"bad setting: {what}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: object) -> bool:
    # abs(), not math.isfinite: a JSON int may be past float range, and nan compares False.
    return (_is_int(value) or isinstance(value, float)) and abs(value) <= sys.float_info.max


def expected_shapes(info: AdapterInfo, config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor of `info`'s adapter on `config`'s model (L, H, P
    and r from `info`, which `check_compatible` matches to `config`; LoRA widths from it)."""
    pattern = shape_pattern(info, config)
    return {key: tuple(int(d or 0) for d in shape) for key, shape in pattern.items()}


def shape_pattern(
    info: AdapterInfo, config: ModelConfig | None
) -> dict[str, tuple[int | None, ...]]:
    """`expected_shapes`, where None stands for a LoRA width that only the model's config
    fixes (all of them when `config` is None)."""
    layers, hidden, prompt, rank = info.num_layers, info.hidden_size, info.prompt_len, info.rank
    shapes: dict[str, tuple[int | None, ...]] = {}
    if info.method != "lora":
        shapes["prompt"] = (prompt, hidden)
    if info.method == "deep_ptune":
        shapes["deep_prompts"] = (layers, prompt, hidden)
    free: dict[str, tuple[int | None, int | None]] = {
        "qkv": (hidden, None),
        "o": (None, hidden),
        "gate_up": (hidden, None),
        "down": (None, hidden),
    }
    for target in info.targets:
        fan_in, fan_out = lora_dims(config, target) if config else free[target]
        shapes[f"lora.{target}.a"] = (layers, rank, fan_in)
        shapes[f"lora.{target}.b"] = (layers, fan_out, rank)
    return shapes


def check_compatible(info: AdapterInfo, config: ModelConfig, model: str) -> None:
    """Raises AdapterError unless `info`'s adapter was trained for `model` with `config`."""
    theirs = (model, config.num_layers, config.hidden_size)
    if (info.model, info.num_layers, info.hidden_size) != theirs:
        raise AdapterError(
            f"adapter {info.name} was trained for {info.model} ({info.num_layers} layers, "
            f"hidden {info.hidden_size}), not {model} ({config.num_layers} layers, "
            f"hidden {config.hidden_size})"
        )


def check_shapes(
    info: AdapterInfo,
    found: Mapping[str, tuple[int, ...]],
    label: str,
    config: ModelConfig | None,
) -> None:
    """Raises AdapterError (`label`: what is wrong) unless the tensors named in `found`, of
    those shapes, are those of `shape_pattern(info, config)`; a free width (None) may be any
    positive one (the store bounds it by the file's size)."""
    expected = shape_pattern(info, config)
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or extra:
        what = [f"lack {', '.join(missing)}"] * bool(missing)
        what += [f"have unexpected {', '.join(extra)}"] * bool(extra)
        raise AdapterError(f"{label}: its tensors {' and '.join(what)}")
    for key, shape in expected.items():
        got = found[key]
        fits = [e in (None, d) and d > 0 for d, e in zip(got, shape, strict=False)]
        if len(got) != len(shape) or not all(fits):
            want = ", ".join("*" if e is None else str(e) for e in shape)
            raise AdapterError(f"{label}: tensor {key} has shape {list(got)}, not [{want}]")


def check_tensors(
    info: AdapterInfo,
    tensors: Mapping[str, Any],
    label: str,
    config: ModelConfig | None = None,
) -> None:
    """`check_shapes` on float tensors, whose values must all be finite."""
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _TORCH_FLOATS:
            raise AdapterError(f"{label}: tensor {key} is not a float tensor")
    check_shapes(info, {key: tuple(t.shape) for key, t in tensors.items()}, label, config)
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{label}: tensor {key} holds non-finite values (inf or nan)")
