"""Our runtime against transformers on tiny random-weight Llama-family models (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers  # the test extra installs it: a missing reference is an error, not a skip
from volunteer.models.checkpoint import load_causal_lm, load_ends, load_span
from volunteer.models.config import ModelConfig

pytestmark = pytest.mark.numerics

ATOL = 1e-4

_COMMON = {
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 10000.0}),
    "llama-tied-bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"tie_word_embeddings": True, "attention_bias": True, "num_key_value_heads": 4},
    ),
    "llama3-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "llama-linear-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"rope_theta": 1000000.0}),
}


def _save_reference(name: str, folder: Path) -> torch.nn.Module:
    config_cls, model_cls, extra = CONFIGS[name]
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        # Random norms and biases too, so a swapped or missing tensor cannot hide.
        for param_name, param in model.named_parameters():
            if "norm" in param_name or param_name.endswith("bias"):
                param.normal_(1.0 if "norm" in param_name else 0.0, 0.2)
    model.save_pretrained(folder)
    return model


@pytest.fixture(params=sorted(CONFIGS))
def reference(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    return _save_reference(request.param, tmp_path), tmp_path


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(
        0, _COMMON["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1)
    )


def test_full_forward_logits_match_transformers(reference: tuple[torch.nn.Module, Path]) -> None:
    hf_model, folder = reference
    ours = load_causal_lm(folder)
    ids = _ids(2, 17)
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = ours(ids)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= ATOL


def test_incremental_decode_equals_full_forward(reference: tuple[torch.nn.Module, Path]) -> None:
    _, folder = reference
    ours = load_causal_lm(folder)
    ids = _ids(2, 12)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.span.allocate_cache(batch_size=2, max_length=16)
        steps = [ours(ids[:, :5], start_pos=0, cache=cache)]
        # One chunk in the middle, then one token at a time.
        steps.append(ours(ids[:, 5:8], start_pos=5, cache=cache))
        for pos in range(8, 12):
            steps.append(ours(ids[:, pos : pos + 1], start_pos=pos, cache=cache))
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= ATOL


def test_span_pieces_chain_to_the_whole_model(reference: tuple[torch.nn.Module, Path]) -> None:
    hf_model, folder = reference
    config = ModelConfig.from_hf_folder(folder)
    ends = load_ends(folder, config)
    first, second = load_span(folder, config, 0, 1), load_span(folder, config, 1, 3)
    ids = _ids(1, 9)
    with torch.no_grad():
        logits = ends.logits(second(first(ends.embed(ids))))
        expected = hf_model(ids).logits
    assert (logits - expected).abs().max().item() <= ATOL


def test_gradients_flow_like_transformers(reference: tuple[torch.nn.Module, Path]) -> None:
    hf_model, folder = reference
    ours = load_causal_lm(folder).train()
    ids = _ids(2, 10)
    ours(ids).logsumexp(-1).mean().backward()
    hf_model.train()
    hf_model(ids).logits.logsumexp(-1).mean().backward()
    ours_grad = ours.span.blocks[0].mlp.down_proj.weight.grad
    hf_grad = hf_model.model.layers[0].mlp.down_proj.weight.grad
    assert ours_grad is not None and ours_grad.abs().sum() > 0
    assert (ours_grad - hf_grad).abs().max().item() <= ATOL
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)
