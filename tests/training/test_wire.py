"""The training peers' messages (`volunteer.training.wire`): what travels comes back
the same, and junk from a peer is refused before any tensor is built."""

from __future__ import annotations

import msgpack
import pytest
import torch

from volunteer.training.wire import WireError, field, pack, unpack


def test_tensors_and_header_travel_unchanged() -> None:
    tensors = [
        torch.randn(2, 3),
        torch.arange(5),
        torch.randn(4, dtype=torch.float64),
        torch.empty(0),
    ]
    header, back = unpack(pack({"op": "share", "step": 3}, tensors))
    assert header == {"op": "share", "step": 3}
    for sent, got in zip(tensors, back, strict=True):
        assert got.dtype == sent.dtype and torch.equal(got, sent)


def _raw(header: object, blobs: object) -> bytes:
    return msgpack.packb([header, blobs], use_bin_type=True)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\xc1junk", "not a training message"),
        (_raw([1], []), "a header and at most"),
        (_raw({}, [["f16", [1], b"\0\0"]]), "dtype 'f16' is not one of"),
        (_raw({}, [["f32", [2, 2], b"\0" * 12]]), "do not fill the shape"),
        (_raw({}, [["f32", [1, 1, 1, 1, 1], b"\0" * 4]]), "at most 4 sizes"),
        (_raw({}, [["f32", [-1], b""]]), "sizes >= 0"),
        (_raw({}, [["f32", [1], b"\x00\x00\xc0\x7f"]]), "not finite"),
        (_raw({}, [["f32", [1]]]), "is not [dtype, shape, bytes]"),
    ],
)
def test_junk_is_refused_with_what_is_wrong(body: bytes, problem: str) -> None:
    with pytest.raises(WireError, match=problem.replace("[", r"\[")):
        unpack(body)


def test_too_many_tensors_are_refused_unread() -> None:
    with pytest.raises(WireError):
        unpack(pack({}, [torch.zeros(1)] * 5), max_tensors=4)


def test_fields_are_checked_for_type_and_bound() -> None:
    assert field({"step": 2}, "step", int, low=0) == 2
    assert field({"wait_s": 1}, "wait_s", float) == 1
    for header in ({}, {"step": "2"}, {"step": -1}, {"step": True}):
        with pytest.raises(WireError, match="'step' must be a whole number >= 0"):
            field(header, "step", int, low=0)
