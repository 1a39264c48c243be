"""The generation loop on a tiny random model, against transformers' greedy generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from volunteer.models.checkpoint import load_causal_lm
from volunteer.models.errors import ContextLengthError
from volunteer.models.generation import LocalStepper, generate_tokens
from volunteer.models.sampling import Sampler, SamplingParams

from tests.models.test_parity import _save_reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    folder = tmp_path_factory.mktemp("tiny-llama")
    return _save_reference("llama", folder), folder


def _generate(folder: Path, prompt: list[int], n: int, **kwargs: object) -> list[int]:
    model = load_causal_lm(folder)
    stepper = LocalStepper.for_generation(model, prompt_len=len(prompt), max_new_tokens=n)
    sampler = Sampler(SamplingParams(**kwargs))  # type: ignore[arg-type]
    return list(generate_tokens(stepper, prompt, max_new_tokens=n, sampler=sampler))


def test_greedy_equals_transformers_generate(tiny: tuple[torch.nn.Module, Path]) -> None:
    hf_model, folder = tiny
    prompt = [5, 17, 3, 42, 8]
    ours = _generate(folder, prompt, 30, temperature=0)
    out = hf_model.generate(
        torch.tensor([prompt]),
        max_new_tokens=30,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert ours == out[0, len(prompt) :].tolist()


def test_stop_token_ends_generation_and_is_not_yielded(tiny: tuple[torch.nn.Module, Path]) -> None:
    _, folder = tiny
    prompt = [5, 17, 3]
    free = _generate(folder, prompt, 12, temperature=0)
    model = load_causal_lm(folder)
    stepper = LocalStepper.for_generation(model, prompt_len=3, max_new_tokens=12)
    stopped = list(
        generate_tokens(
            stepper,
            prompt,
            max_new_tokens=12,
            sampler=Sampler(SamplingParams(temperature=0)),
            stop_token_ids=frozenset({free[4]}),
        )
    )
    assert stopped == free[: free.index(free[4])]


def test_seeded_sampling_reproduces(tiny: tuple[torch.nn.Module, Path]) -> None:
    _, folder = tiny
    first = _generate(folder, [1, 2, 3], 20, temperature=1.0, top_p=0.95, seed=11)
    assert first == _generate(folder, [1, 2, 3], 20, temperature=1.0, top_p=0.95, seed=11)
    assert len(first) == 20


def test_prompt_longer_than_context_is_refused(tiny: tuple[torch.nn.Module, Path]) -> None:
    _, folder = tiny
    model = load_causal_lm(folder)
    with pytest.raises(ContextLengthError, match="context"):
        LocalStepper.for_generation(model, prompt_len=500, max_new_tokens=1)


def test_cache_refuses_overflow_and_gaps(tiny: tuple[torch.nn.Module, Path]) -> None:
    _, folder = tiny
    model = load_causal_lm(folder)
    stepper = LocalStepper.for_generation(model, prompt_len=4, max_new_tokens=2)
    stepper(torch.tensor([[1, 2, 3, 4]]), 0)
    with pytest.raises(ContextLengthError, match="skips"):
        stepper(torch.tensor([[5]]), 6)
    with pytest.raises(ContextLengthError, match="full"):
        stepper(torch.tensor([[5, 6, 7]]), 4)
    # Replaying from an earlier position (after a failover, say) is allowed.
    stepper(torch.tensor([[3, 4]]), 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_float32(
    tiny: tuple[torch.nn.Module, Path], dtype: torch.dtype
) -> None:
    _, folder = tiny
    ids = torch.tensor([[5, 17, 3, 42, 8, 9]])
    expected = load_causal_lm(folder)(ids).detach()
    low = load_causal_lm(folder, dtype=dtype)
    with torch.no_grad():
        actual = low(ids)
        cache = low.span.allocate_cache(batch_size=1, max_length=8)
        low(ids[:, :5], cache=cache)
        last = low(ids[:, 5:], start_pos=5, cache=cache)
    assert actual.dtype == dtype
    assert (actual.float() - expected).abs().max().item() < 0.1 * expected.abs().max().item()
    assert (last[:, -1].float() - actual[:, -1].float()).abs().max().item() < 0.05
