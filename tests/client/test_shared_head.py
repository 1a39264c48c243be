"""The LM head shared by concurrent replies: rows from many threads go through it
together, and each thread gets exactly the logits of its rows alone."""

from __future__ import annotations

import threading

import pytest
import torch
from volunteer.models.config import ModelConfig
from volunteer.models.model import ModelEnds
from volunteer.models.weight_format import WeightFormat, compress_head

from volunteer.client.shared_head import MAX_ROWS, SharedHead

THREADS = 8
CALLS = 25


def _ends(dtype: str) -> ModelEnds:
    config = ModelConfig(
        arch="llama",
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=512,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(3)
    ends = ModelEnds(config).eval()
    compress_head(ends, WeightFormat(dtype=dtype))  # (fp32: left as it is)
    return ends


def _hammer(head: SharedHead, inputs: list[list[torch.Tensor]]) -> list[list[object]]:
    """Each thread's inputs through the head at once; each call's logits or error."""
    results: list[list[object]] = [[] for _ in inputs]
    start = threading.Barrier(len(inputs))

    def run(index: int) -> None:
        start.wait()
        for hidden in inputs[index]:
            try:
                results[index].append(head.logits(hidden))
            except Exception as exc:
                results[index].append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return results


@pytest.mark.parametrize("dtype", ["int8", "fp32"])
def test_rows_taken_together_equal_each_alone(dtype: str) -> None:
    ends = _ends(dtype)
    head = SharedHead(ends)
    width = ends.config.hidden_size
    generator = torch.Generator().manual_seed(7)
    # Replies hand in their last position; a batch of two rows and a prompt's two
    # positions come in too.
    shapes = [(1, 1), (1, 1), (2, 1), (1, 2)]
    inputs = [
        [torch.randn(*shapes[(t + c) % 4], width, generator=generator) for c in range(CALLS)]
        for t in range(THREADS)
    ]
    results = _hammer(head, inputs)
    for hiddens, outputs in zip(inputs, results, strict=True):
        for hidden, output in zip(hiddens, outputs, strict=True):
            assert isinstance(output, torch.Tensor)
            with torch.inference_mode():
                alone = ends.logits(hidden)
            assert output.shape == alone.shape
            if dtype == "int8":  # the int8 kernel computes each row the same in any batch
                assert torch.equal(output, alone)
            else:  # float32 matmuls of other sizes add in another order
                torch.testing.assert_close(output, alone, rtol=1e-5, atol=1e-5)
    assert head.requests == THREADS * CALLS
    assert head.calls < head.requests, "no rows ever went through the head together"


def test_a_bad_request_fails_alone() -> None:
    ends = _ends("int8")
    head = SharedHead(ends)
    width = ends.config.hidden_size
    generator = torch.Generator().manual_seed(8)
    good = [[torch.randn(1, 1, width, generator=generator) for _ in range(CALLS)] for _ in range(6)]
    # As many numbers as two good rows: taken together they would pass as rows of others.
    bad = [[torch.randn(1, 1, 2 * width, generator=generator) for _ in range(CALLS)]] * 2
    results = _hammer(head, good + bad)
    for hiddens, outputs in zip(good, results[:6], strict=True):
        for hidden, output in zip(hiddens, outputs, strict=True):
            assert isinstance(output, torch.Tensor)
            with torch.inference_mode():
                assert torch.equal(output, ends.logits(hidden))
    for outputs in results[6:]:
        assert all(isinstance(output, RuntimeError) for output in outputs)
    assert head.calls < head.requests


def test_a_call_takes_at_most_max_rows() -> None:
    ends = _ends("int8")
    head = SharedHead(ends)
    many = torch.randn(3, MAX_ROWS, ends.config.hidden_size)
    inputs = [[many[index : index + 1]] for index in range(3)]
    results = _hammer(head, inputs)
    for hidden, (output,) in zip(inputs, results, strict=True):
        assert isinstance(output, torch.Tensor)
        with torch.inference_mode():
            assert torch.equal(output, ends.logits(hidden[0]))
    assert head.calls == 3  # no two such requests fit one call
