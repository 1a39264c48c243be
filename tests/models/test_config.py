"""ModelConfig readers: HF config.json variants, GGUF metadata, and bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from volunteer.models.config import ModelConfig, RopeScaling
from volunteer.models.errors import ModelConfigError, UnsupportedArchitectureError

SMOLLM2_HF = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_smollm2_config_reads_every_field() -> None:
    config = ModelConfig.from_hf_dict(SMOLLM2_HF)
    assert (config.arch, config.num_layers, config.head_dim) == ("llama", 30, 64)
    assert (config.num_heads, config.num_kv_heads, config.kv_size) == (9, 3, 192)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert config.eos_token_ids == (2,) and not config.qkv_bias


def test_round_trip_through_hf_dict() -> None:
    raw = {
        **SMOLLM2_HF,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "eos_token_id": [2, 7],
    }
    config = ModelConfig.from_hf_dict(raw)
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_transformers5_rope_parameters_and_legacy_type_key() -> None:
    new_style = {**SMOLLM2_HF, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}
    assert ModelConfig.from_hf_dict(new_style).rope_theta == 5e5
    legacy = {**SMOLLM2_HF, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert ModelConfig.from_hf_dict(legacy).rope_scaling == RopeScaling("linear", 2.0)


def test_qwen2_has_qkv_bias_and_mistral_a_window() -> None:
    assert ModelConfig.from_hf_dict({**SMOLLM2_HF, "model_type": "qwen2"}).qkv_bias
    mistral = ModelConfig.from_hf_dict(
        {**SMOLLM2_HF, "model_type": "mistral", "sliding_window": 64}
    )
    assert mistral.sliding_window == 64


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"model_type": "gpt_neox"}, UnsupportedArchitectureError, "gpt_neox"),
        ({"hidden_size": None}, ModelConfigError, "hidden_size"),
        ({"num_hidden_layers": "30"}, ModelConfigError, "num_hidden_layers"),
        ({"num_key_value_heads": 4}, ModelConfigError, "multiple"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ModelConfigError, "yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ModelConfigError, "llama3"),
    ],
)
def test_bad_configs_name_the_problem(change: dict, error: type, words: str) -> None:
    raw = {k: v for k, v in {**SMOLLM2_HF, **change}.items() if v is not None}
    with pytest.raises(error, match=words):
        ModelConfig.from_hf_dict(raw)


def test_folder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="not found"):
        ModelConfig.from_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        ModelConfig.from_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ModelConfigError, match="JSON object"):
        ModelConfig.from_hf_folder(tmp_path)


def test_gguf_metadata() -> None:
    meta = {
        "general.architecture": "llama",
        "llama.block_count": 30,
        "llama.context_length": 8192,
        "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        "llama.rope.freq_base": 100000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.tokens": ["a"] * 49152,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.bos_token_id": 1,
    }
    config = ModelConfig.from_gguf_metadata(meta, tie_word_embeddings=True)
    assert config == ModelConfig.from_hf_dict(SMOLLM2_HF)
    with pytest.raises(UnsupportedArchitectureError, match="falcon"):
        ModelConfig.from_gguf_metadata(
            {**meta, "general.architecture": "falcon"}, tie_word_embeddings=True
        )
    del meta["llama.block_count"]
    with pytest.raises(ModelConfigError, match=r"llama\.block_count"):
        ModelConfig.from_gguf_metadata(meta, tie_word_embeddings=True)


@pytest.mark.parametrize(
    "change",
    [
        {"num_attention_heads": 0},
        {"rope_scaling": {"rope_type": "linear"}},
        {"rope_scaling": "linear"},
        {"rope_parameters": [1, 2]},
        {"rms_norm_eps": "small"},
        {"rope_scaling": {"rope_type": "linear", "factor": 0.0}},
    ],
)
def test_malformed_values_become_config_errors(change: dict) -> None:
    with pytest.raises(ModelConfigError):
        ModelConfig.from_hf_dict({**SMOLLM2_HF, **change})
