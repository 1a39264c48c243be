"""The form a stage peer's answer to a microbatch call must have, checked by the driver
before it uses the answer: a peer that answers junk has failed the call."""

from __future__ import annotations

import math
from typing import Any

import torch


def answer_problem(
    op: str, first: bool, sent: list[torch.Tensor], answer: dict[str, Any], out: list
) -> str | None:
    """What is wrong with a microbatch answer's form, or None: a forward gives hidden
    states [B, S, H] for the microbatch (the input's shape past the first stage); a
    backward, and a loss past the first stage, the gradient w.r.t. the input; a loss, a
    finite number."""
    given = sent[0]
    if op == "forward":
        ok = (
            len(out) == 1
            and out[0].is_floating_point()
            and out[0].dim() == 3
            and out[0].shape[:2] == given.shape[:2]
            and (first or out[0].shape == given.shape)
        )
        return None if ok else "a forward output of the wrong form"
    if op == "loss":
        loss = answer.get("loss")
        if not isinstance(loss, float) or not math.isfinite(loss):
            return "a loss that is not a finite number"
    # backward: `given` is the gradient w.r.t. the output, shaped as the input past stage 0
    ok = not out if first else len(out) == 1 and out[0].shape == given.shape
    return None if ok else f"a {op} gradient of the wrong form"
