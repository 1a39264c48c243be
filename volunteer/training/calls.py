"""Calling a training peer: one request, one answer (`volunteer.transport.one_shot`),
in the message format of `volunteer.training.wire`.

Every call has a deadline; a peer that answers late, with junk or with an error is a
`TrainingCallError`, which the caller treats as that peer failing this step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from hivemind.p2p import P2P

from volunteer.errors import VolunteerError
from volunteer.training import wire
from volunteer.transport.one_shot import ExchangeError, ask

TRAIN_HANDLE = "Train.call"
MAX_ERROR_CHARS = 300
FENCED = "a later driver drives this job"
"""A stage peer's refusal of a driver that another took over from (`TrainingPeer`)."""
MAX_ROUNDS = 8
"""Gather rounds a stage may take to close a step (each drops peers; then it stalls)."""


class TrainingCallError(VolunteerError):
    """A training peer did not do what it was asked (unreachable, late, junk, refused)."""


async def call(
    p2p: P2P,
    peer_id: str,
    header: dict[str, Any],
    tensors: Sequence[torch.Tensor] = (),
    *,
    timeout_s: float,
    max_answer_bytes: int,
    handle: str = TRAIN_HANDLE,
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The peer's answer to `header` (its op and fields) and `tensors`, on `handle`.

    Raises:
        TrainingCallError: see the class.
    """
    try:
        body = await ask(
            p2p,
            peer_id,
            handle,
            wire.pack(header, tensors),
            max_answer_bytes=max_answer_bytes,
            timeout_s=timeout_s,
        )
        answer, out = wire.unpack(body)
    except (ExchangeError, wire.WireError) as exc:
        raise TrainingCallError(f"{header.get('op')} on {peer_id}: {exc}") from None
    if "error" in answer:
        reason = str(answer["error"])[:MAX_ERROR_CHARS]
        raise TrainingCallError(f"{header.get('op')} on {peer_id} refused: {reason}")
    return answer, out


def refusal(reason: str) -> bytes:
    """An answer that refuses a call."""
    return wire.pack({"error": reason[:MAX_ERROR_CHARS]})
