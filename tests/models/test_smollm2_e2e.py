"""The real SmolLM2-135M-Instruct through our runtime, against transformers' own GGUF import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from volunteer.models.checkpoint import load_causal_lm
from volunteer.models.generation import LocalStepper, generate_tokens
from volunteer.models.sampling import Sampler, SamplingParams
from volunteer.models.tokenizer import Tokenizer

from volunteer.chat.local import Conversation, LocalChat

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference(hf_smollm2_model: Any, hf_smollm2_tokenizer: Any) -> tuple[Any, Any]:
    """transformers' own import of the same GGUF: model and tokenizer."""
    return hf_smollm2_model, hf_smollm2_tokenizer


def test_greedy_answer_names_paris(smollm2_folder: Path) -> None:
    chat = LocalChat.load(smollm2_folder)
    conversation = Conversation(messages=list(QUESTION))
    answer = "".join(
        chat.stream_reply(conversation, max_new_tokens=48, sampling=SamplingParams(temperature=0))
    )
    assert "Paris" in answer


def test_greedy_64_tokens_equal_transformers(
    smollm2_folder: Path, reference: tuple[torch.nn.Module, object]
) -> None:
    hf_model, hf_tokenizer = reference
    ours_tokenizer = Tokenizer.from_folder(smollm2_folder)
    prompt = ours_tokenizer.encode_chat(QUESTION)
    hf_prompt = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    hf_prompt = hf_prompt["input_ids"] if not isinstance(hf_prompt, list) else hf_prompt
    assert prompt == list(hf_prompt)

    model = load_causal_lm(smollm2_folder)
    stepper = LocalStepper.for_generation(model, prompt_len=len(prompt), max_new_tokens=64)
    # End token disabled on both sides, so 64 tokens run past the short answer.
    ours = list(
        generate_tokens(
            stepper, prompt, max_new_tokens=64, sampler=Sampler(SamplingParams(temperature=0))
        )
    )
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False)
    assert ours == out[0, len(prompt) :].tolist()
    assert len(ours) == 64


def test_every_block_matches_transformers_logits(
    smollm2_folder: Path, reference: tuple[torch.nn.Module, object]
) -> None:
    hf_model, _ = reference
    model = load_causal_lm(smollm2_folder)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 198]])
    with torch.inference_mode():
        diff = (model(ids) - hf_model(ids).logits).abs().max().item()
    assert diff <= 1e-3


def test_loading_six_of_thirty_blocks_reads_only_those(smollm2_folder: Path) -> None:
    # A fresh interpreter, so nothing else this test session loaded counts.
    code = f"""
import gc, json, psutil, torch
from volunteer.models.checkpoint import load_span
from volunteer.models.config import ModelConfig
from volunteer.models.model import BlockSpan
folder = {str(smollm2_folder)!r}
config = ModelConfig.from_hf_folder(folder)
with torch.device("meta"):
    BlockSpan(config, 0, 1)  # warm torch's lazily built dispatch tables first
process = psutil.Process()
before = process.memory_info().rss
span = load_span(folder, config, 0, 6)
gc.collect()
weights = sum(p.numel() * p.element_size() for p in span.parameters())
print(json.dumps({{"growth": process.memory_info().rss - before, "weights": weights}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    figures = json.loads(out.stdout)
    model_bytes = sum(p.stat().st_size for p in smollm2_folder.glob("*.safetensors"))
    # Six blocks are about a sixth of the file; the bound leaves room for the RoPE table
    # and allocator slack, but is far below what reading the other 24 blocks would add.
    assert figures["weights"] < model_bytes / 5
    assert figures["growth"] < 1.5 * figures["weights"] + 16 * 2**20
    assert figures["growth"] < model_bytes / 3
