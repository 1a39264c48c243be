"""What 4-bit weights cost in accuracy: SmolLM2's perplexity on held-out prose
(`tests/data/heldout_prose.txt`, public-domain passages the test ships) against float32,
within 5%, and the embedded Paris answer. (`bench/local_generate.py` prints the
perplexity of every form; these forwards are slow on 2 cores, so the test keeps to q4.)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from volunteer.models.checkpoint import load_causal_lm
from volunteer.models.model import CausalLM
from volunteer.models.sampling import SamplingParams
from volunteer.models.tokenizer import Tokenizer
from volunteer.models.weight_format import WeightFormat

from volunteer.chat.local import Conversation, LocalChat

pytestmark = pytest.mark.slow

HELDOUT = Path(__file__).resolve().parents[1] / "data" / "heldout_prose.txt"
WINDOW = 1024
"""Tokens per forward; each window starts a fresh context (the same for every form)."""
MAX_RATIO = 1.05


def perplexity(model: CausalLM, ids: list[int]) -> float:
    """exp(mean next-token loss) over `ids`, in windows of `WINDOW` tokens."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, WINDOW):
            window = torch.tensor([ids[start : start + WINDOW + 1]])
            logits = model(window[:, :-1]).float()
            total += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def heldout_ids(smollm2_folder: Path) -> list[int]:
    ids = Tokenizer.from_folder(smollm2_folder).encode(HELDOUT.read_text(encoding="utf-8"))
    assert len(ids) > 3000, "the held-out text should be a few thousand tokens"
    return ids


@pytest.fixture(scope="module")
def fp32_perplexity(smollm2_folder: Path, heldout_ids: list[int]) -> float:
    return perplexity(load_causal_lm(smollm2_folder), heldout_ids)


def test_4_bit_perplexity_stays_within_5_percent_of_float32(
    smollm2_folder: Path, heldout_ids: list[int], fp32_perplexity: float
) -> None:
    model = load_causal_lm(smollm2_folder, fmt=WeightFormat.parse("q4"))
    ratio = perplexity(model, heldout_ids) / fp32_perplexity
    # A model this size on well-known prose: float32 is confident, not lost.
    assert 5 < fp32_perplexity < 60
    assert ratio <= MAX_RATIO, f"q4: perplexity {ratio:.3f}x float32's"


def test_the_4_bit_model_still_answers_paris(smollm2_folder: Path) -> None:
    chat = LocalChat.load(smollm2_folder, fmt=WeightFormat.parse("q4"))
    conversation = Conversation(
        messages=[{"role": "user", "content": "What is the capital of France?"}]
    )
    answer = "".join(
        chat.stream_reply(conversation, max_new_tokens=48, sampling=SamplingParams(temperature=0))
    )
    assert "Paris" in answer
