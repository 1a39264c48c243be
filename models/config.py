"""Configuration of a Llama-family model, read from HF `config.json` or GGUF metadata.

One frozen `ModelConfig` describes llama (with linear or llama3 RoPE scaling), mistral,
qwen2 (q/k/v bias) and SmolLM (a llama). Readers check every field they need and raise
`ModelConfigError` naming the missing or bad field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from volunteer.models.errors import ModelConfigError, UnsupportedArchitectureError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
ROPE_KINDS = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for contexts longer than pre-training."""

    kind: str = "default"
    """One of `ROPE_KINDS`."""
    factor: float = 1.0
    """Context extension factor (linear: positions are divided by it)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths longer than original_context / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than original_context / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """llama3: the context length the model was pre-trained with."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder."""

    arch: str
    """Model family: one of `SUPPORTED_ARCHITECTURES`."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    """q/k/v projections carry a bias (qwen2; llama with attention_bias)."""
    o_bias: bool = False
    """The output projection carries a bias (llama with attention_bias)."""
    mlp_bias: bool = False
    sliding_window: int | None = None
    """mistral: each token attends to at most this many previous positions."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unsupported model architecture {self.arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            _require_positive(name, getattr(self, name))
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            _require_positive(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ModelConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_scaling.factor > 0:
            raise ModelConfigError(
                f"RoPE scaling factor must be positive, got {self.rope_scaling.factor}"
            )
        if self.rope_scaling.kind not in ROPE_KINDS:
            raise ModelConfigError(
                f"unsupported RoPE scaling {self.rope_scaling.kind!r}; "
                f"supported: {', '.join(ROPE_KINDS)}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """See `_from_hf_dict`; any value of the wrong type becomes a ModelConfigError."""
        try:
            return cls._from_hf_dict(raw)
        except _MALFORMED as exc:
            raise ModelConfigError(f"malformed model config: {exc!r}") from exc

    @classmethod
    def _from_hf_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from the contents of a Hugging Face `config.json`.

        Raises:
            UnsupportedArchitectureError: `model_type` is not a Llama-family model.
            ModelConfigError: a required field is missing or malformed.
        """
        arch = raw.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unsupported model_type {arch!r} in config.json; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden = _int_field(raw, "hidden_size")
        heads = _positive_int_field(raw, "num_attention_heads")
        rope = raw.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling") or rope
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            arch=arch,
            vocab_size=_int_field(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int_field(raw, "intermediate_size"),
            num_layers=_int_field(raw, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_int_field(raw, "num_key_value_heads", default=heads),
            head_dim=_int_field(raw, "head_dim", default=hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=_rope_scaling_from_hf(scaling),
            max_position_embeddings=_int_field(raw, "max_position_embeddings", default=2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or attention_bias,
            o_bias=arch == "llama" and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=_sliding_window(raw) if arch == "mistral" else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_id_tuple(raw.get("eos_token_id")),
        )

    @classmethod
    def from_hf_folder(cls, folder: Path) -> ModelConfig:
        """Reads `config.json` from a Hugging Face model folder."""
        path = Path(folder) / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelConfigError(
                f"{path} not found: is this a Hugging Face model folder?"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelConfigError(f"{path} must hold a JSON object")
        return cls.from_hf_dict(raw)

    @classmethod
    def from_gguf_metadata(
        cls, meta: Mapping[str, Any], *, tie_word_embeddings: bool
    ) -> ModelConfig:
        """See `_from_gguf_metadata`; a value of the wrong type becomes a ModelConfigError."""
        try:
            return cls._from_gguf_metadata(meta, tie_word_embeddings=tie_word_embeddings)
        except _MALFORMED as exc:
            raise ModelConfigError(f"malformed GGUF metadata: {exc!r}") from exc

    @classmethod
    def _from_gguf_metadata(
        cls, meta: Mapping[str, Any], *, tie_word_embeddings: bool
    ) -> ModelConfig:
        """Builds a config from GGUF key/value metadata (plain Python values).

        Args:
            meta: GGUF key/value pairs, decoded to str/int/float/list.
            tie_word_embeddings: whether the file lacks `output.weight`, so the LM head
                reuses the token embedding (GGUF says so only by the missing tensor).

        Raises:
            UnsupportedArchitectureError: `general.architecture` is not llama/qwen2.
            ModelConfigError: a required key is missing or malformed.
        """
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2"):
            raise UnsupportedArchitectureError(
                f"unsupported GGUF architecture {arch!r}; supported: llama, qwen2"
            )
        hidden = _int_field(meta, f"{arch}.embedding_length")
        heads = _positive_int_field(meta, f"{arch}.attention.head_count")
        vocab_default = len(meta.get("tokenizer.ggml.tokens") or []) or None
        scaling_kind = meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling_kind not in ("none", "linear"):
            raise ModelConfigError(f"unsupported GGUF RoPE scaling {scaling_kind!r}")
        rope_scaling = RopeScaling()
        if scaling_kind == "linear":
            rope_scaling = RopeScaling(
                kind="linear", factor=float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
            )
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            arch=arch,
            vocab_size=_int_field(meta, f"{arch}.vocab_size", default=vocab_default),
            hidden_size=hidden,
            intermediate_size=_int_field(meta, f"{arch}.feed_forward_length"),
            num_layers=_int_field(meta, f"{arch}.block_count"),
            num_heads=heads,
            num_kv_heads=_int_field(meta, f"{arch}.attention.head_count_kv", default=heads),
            head_dim=_int_field(meta, f"{arch}.attention.key_length", default=hidden // heads),
            rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=_int_field(meta, f"{arch}.context_length", default=2048),
            tie_word_embeddings=tie_word_embeddings,
            qkv_bias=arch == "qwen2",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_id_tuple(eos),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` contents that `from_hf_dict` reads back to this config."""
        raw: dict[str, Any] = {
            "model_type": self.arch,
            "architectures": [_HF_CLASS[self.arch]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.arch == "llama":
            raw["attention_bias"] = self.qkv_bias
        if self.arch == "mistral":
            raw["sliding_window"] = self.sliding_window
        if self.rope_scaling.kind != "default":
            raw["rope_scaling"] = _rope_scaling_to_hf(self.rope_scaling)
        if self.bos_token_id is not None:
            raw["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            eos = self.eos_token_ids
            raw["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
        return raw


# What a wrongly typed value raises on its way through float(), int(), [] or .get().
_MALFORMED = (TypeError, ValueError, KeyError, AttributeError, ArithmeticError)

_HF_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")


def _int_field(raw: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ModelConfigError(f"model config is missing the required field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelConfigError(f"model config field {key!r} must be an integer, got {value!r}")
    return value


def _positive_int_field(raw: Mapping[str, Any], key: str) -> int:
    # Checked before it divides anything (the default head_dim is hidden // heads).
    value = _int_field(raw, key)
    if value <= 0:
        raise ModelConfigError(f"model config field {key!r} must be positive, got {value}")
    return value


def _id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise ModelConfigError(f"eos_token_id must be an integer or a list of them, got {value!r}")


def _sliding_window(raw: Mapping[str, Any]) -> int | None:
    window = raw.get("sliding_window")
    if window is None:
        return None
    return _int_field(raw, "sliding_window")


def _rope_scaling_from_hf(scaling: Mapping[str, Any]) -> RopeScaling:
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(scaling["factor"]))
    if kind == "llama3":
        try:
            return RopeScaling(
                kind="llama3",
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            )
        except KeyError as exc:
            raise ModelConfigError(f"llama3 rope_scaling is missing {exc.args[0]!r}") from exc
    raise ModelConfigError(
        f"unsupported rope_scaling type {kind!r}; supported: {', '.join(ROPE_KINDS)}"
    )


def _rope_scaling_to_hf(scaling: RopeScaling) -> dict[str, Any]:
    raw: dict[str, Any] = {"rope_type": scaling.kind, "factor": scaling.factor}
    if scaling.kind == "llama3":
        raw["low_freq_factor"] = scaling.low_freq_factor
        raw["high_freq_factor"] = scaling.high_freq_factor
        raw["original_max_position_embeddings"] = scaling.original_max_position_embeddings
    return raw
