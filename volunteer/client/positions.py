"""Hidden-state histories as lists of chunks ([B, S, H] at consecutive positions from 0):
cut at a position, taken between two, or regrouped into steps a server takes."""

from __future__ import annotations

import torch


def keep_before(chunks: list[torch.Tensor], position: int) -> list[torch.Tensor]:
    """The part of `chunks` before `position`."""
    kept, length = [], 0
    for chunk in chunks:
        if length >= position:
            break
        kept.append(chunk[:, : position - length])
        length += kept[-1].shape[1]
    return kept


def between(chunks: list[torch.Tensor], start: int, end: int) -> list[torch.Tensor]:
    """The part of `chunks` in [start, end)."""
    taken, length = [], 0
    for chunk in chunks:
        size = chunk.shape[1]
        if length + size > start and length < end:
            taken.append(chunk[:, max(start - length, 0) : end - length])
        length += size
    return taken


def regroup(chunks: list[torch.Tensor], max_chunk: int | None) -> list[torch.Tensor]:
    """`chunks` as pieces of max_chunk positions (the last may be shorter); as they are
    when max_chunk is None: a server that does not say what it takes gets what a server
    took before."""
    if max_chunk is None or not chunks:
        return chunks
    if len(chunks) == 1 and chunks[0].shape[1] <= max_chunk:
        return chunks
    return list(torch.cat(chunks, dim=1).split(max_chunk, dim=1))
