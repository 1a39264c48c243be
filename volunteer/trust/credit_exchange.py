"""Receipts and credit proofs over p2p streams: one request frame, one answer frame.

- `RECEIPT_HANDLE`: a client hands a server a receipt (`volunteer.trust.receipts`); the
  answer is empty (kept) or the reason it was refused.
- `PROOF_HANDLE`: an auditor names a summary's root, what each amount weighs and its
  draws (points on that weight); the answer holds, for each draw, the leaf it falls on,
  the leaf's path to the root and the receipt behind it (`volunteer.trust.credit_audit`
  checks them).

Both travel as one-shot exchanges (`volunteer.transport.one_shot`, re-exported here).
"""

from __future__ import annotations

import msgpack

from volunteer.transport.one_shot import (  # noqa: F401 (the credit side names them here)
    REQUEST_TIMEOUT_S,
    ExchangeError,
    ask,
    serve,
)
from volunteer.trust.credit_tree import MAX_DEPTH, SUMS, Coefficients, Leaf, Sibling
from volunteer.trust.receipts import MAX_RECEIPT_BYTES

RECEIPT_HANDLE = "Credit.receipt"
PROOF_HANDLE = "Credit.proof"
MAX_DRAWS = 8
MAX_ANSWER_BYTES = 64 << 10
MAX_PROOF_ANSWER_BYTES = MAX_DRAWS * (MAX_RECEIPT_BYTES + MAX_DEPTH * 80 + 256)

Proven = tuple[Leaf, list[Sibling], bytes]
"""A draw's leaf, its path up the tree, and the receipt's bytes."""


def pack_draws(root: bytes, coefficients: Coefficients, points: list[int]) -> bytes:
    return msgpack.packb([root, list(coefficients), points], use_bin_type=True)


def unpack_draws(body: bytes) -> tuple[bytes, Coefficients, list[int]]:
    """Raises ExchangeError: not a root, SUMS coefficients and at most MAX_DRAWS points."""
    try:
        root, coefficients, points = msgpack.unpackb(
            body, raw=False, max_array_len=max(MAX_DRAWS, SUMS), max_map_len=0
        )
        found = (_bytes(root), _ints(coefficients), _ints(points))
    except Exception as exc:  # junk takes many forms
        raise ExchangeError(f"malformed draws ({type(exc).__name__})") from None
    _, weights, drawn = found
    if len(weights) != SUMS or not all(0 <= c < 1 << 32 for c in weights):
        raise ExchangeError(f"draws weigh {SUMS} amounts, each by a 32-bit coefficient")
    if len(drawn) > MAX_DRAWS or any(point < 0 for point in drawn):
        raise ExchangeError(f"at most {MAX_DRAWS} non-negative points")
    return found


def pack_proofs(proven: list[Proven]) -> bytes:
    return msgpack.packb(
        [
            [
                leaf.receipt_id,
                list(leaf.sums),
                [[s.digest, list(s.sums), s.is_left] for s in path],
                raw,
            ]
            for leaf, path, raw in proven
        ],
        use_bin_type=True,
    )


def unpack_proofs(body: bytes) -> list[Proven]:
    """Raises ExchangeError: not a list of (leaf, path, receipt) within bounds."""
    try:
        items = msgpack.unpackb(
            body, raw=False, use_list=False, max_array_len=max(MAX_DRAWS, MAX_DEPTH, SUMS)
        )
        proven = []
        # Sums stay as sent: `check_proof` checks each before it adds any.
        for receipt_id, sums, path, raw in items:
            siblings = [Sibling(_bytes(d), s, left is True) for d, s, left in path]
            proven.append((Leaf(_bytes(receipt_id), sums), siblings, _bytes(raw)))
    except Exception as exc:  # junk takes many forms
        raise ExchangeError(f"malformed proofs ({type(exc).__name__})") from None
    return proven


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError("expected bytes")
    return value


def _ints(values: object) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(type(x) is int for x in values):
        raise TypeError("expected a list of integers")
    return tuple(values)
