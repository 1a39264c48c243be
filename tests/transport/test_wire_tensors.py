"""Tensors on the wire: our own packing reads and writes hivemind's uncompressed layout."""

from __future__ import annotations

import pytest
import torch
from hivemind.compression.serialization import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

import volunteer.transport.framing as framing
from volunteer.transport.protocol import BadRequestError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _sample(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_our_packing_is_what_hivemind_reads(dtype: torch.dtype) -> None:
    tensor = _sample(dtype)
    read = deserialize_torch_tensor(framing.pack_tensor(tensor))
    assert read.dtype == dtype and read.shape == tensor.shape
    assert torch.equal(read, tensor)


@pytest.mark.parametrize("dtype", DTYPES)
def test_we_read_what_hivemind_packs(dtype: torch.dtype) -> None:
    tensor = _sample(dtype)
    read = framing.unpack_hidden(serialize_torch_tensor(tensor), hidden_size=8, max_positions=6)
    assert read.dtype == dtype and read.shape == tensor.shape
    assert torch.equal(read, tensor)
    read[0, 0, 0] = 7  # the tensor owns its memory
    assert read[0, 0, 0] == 7


def test_bfloat16_sent_as_float32_bytes_is_read() -> None:
    """hivemind's legacy bfloat16 layout: the values widened to float32."""
    tensor = _sample(torch.bfloat16)
    proto = runtime_pb2.Tensor(
        buffer=tensor.float().numpy().tobytes(), size=tensor.shape, dtype="bfloat16"
    )
    read = framing.unpack_tensor(proto, max_numel=48)
    assert read.dtype == torch.bfloat16 and torch.equal(read, tensor)


def test_a_tensor_keeps_requires_grad() -> None:
    tensor = _sample(torch.float32).requires_grad_()
    assert framing.unpack_tensor(framing.pack_tensor(tensor), max_numel=48).requires_grad


@pytest.mark.parametrize(
    ("proto", "reason"),
    [
        (runtime_pb2.Tensor(buffer=bytes(8), size=[2], dtype="int64"), "dtype 'int64' not"),
        (runtime_pb2.Tensor(buffer=bytes(7), size=[2], dtype="float32"), "buffer holds 7 bytes"),
        (runtime_pb2.Tensor(buffer=b"", size=[10**6, 10**6], dtype="float16"), "at most 1000"),
    ],
)
def test_a_bad_tensor_is_refused(proto: runtime_pb2.Tensor, reason: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        framing.unpack_tensor(proto, max_numel=1000)
    assert reason in str(caught.value)
