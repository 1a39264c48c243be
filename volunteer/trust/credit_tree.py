"""A Merkle sum tree over a server's counted receipts: how a summary commits to them.

Each leaf is one receipt's name and its counted amounts (`SUMS`: credit, credit decayed
to the summary's time, checks passed); each inner node hashes its children and holds
the sums of their amounts, so the root commits to every receipt and to the totals the
summary claims. An auditor weighs the amounts (`weight`: a coefficient per amount, so
that one draw may land on inflated credit, recent credit or checks alike), draws a point
in [0, the root's weight) and asks for the leaf that covers it (`SumTree.prove`): the
proof is that leaf's siblings up the tree, and `check_proof` recomputes the root from
them and checks that the leaf does cover the point. A summary whose totals are not
backed by receipts has leaves that are not, and each draw lands on one of them with the
share of the weight they claim.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

SUMS = 3
"""Amounts per leaf: credit, recent credit (decayed to the summary's time), checks passed."""
CREDIT, RECENT, PASSED = range(SUMS)
MAX_DEPTH = 40
_LEAF = b"volunteer-credit-leaf-v1"
_NODE = b"volunteer-credit-node-v1"


class ProofError(ValueError):
    """A proof that does not lead to the root, or to the point drawn."""


@dataclasses.dataclass(frozen=True)
class Leaf:
    receipt_id: bytes
    """The receipt's sha256 (32 bytes)."""
    sums: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Sibling:
    digest: bytes
    sums: tuple[int, ...]
    is_left: bool
    """Whether the sibling is the left child (the proven path goes right there)."""


Coefficients = tuple[int, ...]
"""What each amount weighs in a draw (`SUMS` non-negative integers)."""


_SUMS_BYTES = struct.Struct(">3Q")
"""A node's sums as hashed: three unsigned 64-bit integers (`SUMS` is 3)."""


# Spelled out for three amounts: audits call these at every level of every proof.
def weight(sums: tuple[int, ...], coefficients: Coefficients) -> int:
    return coefficients[0] * sums[0] + coefficients[1] * sums[1] + coefficients[2] * sums[2]


def _encode(sums: tuple[int, ...]) -> bytes:
    try:
        return _SUMS_BYTES.pack(*sums)
    except struct.error:
        raise ProofError("sums outside 64 bits") from None


def leaf_digest(leaf: Leaf) -> bytes:
    return _leaf_hash(leaf.receipt_id, _encode(leaf.sums))


def node_digest(left: bytes, right: bytes, sums: tuple[int, ...]) -> bytes:
    return _node_hash(left, right, _encode(sums))


# The hashes over sums already packed: the tree and `check_proof` (which packs each
# peer-sent amount itself, to check it) hash alike through these.
def _leaf_hash(receipt_id: bytes, packed: bytes) -> bytes:
    return hashlib.sha256(_LEAF + receipt_id + packed).digest()


def _node_hash(left: bytes, right: bytes, packed: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right + packed).digest()


def _add(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


class SumTree:
    """The tree over `leaves`, in their order (the empty tree has a zero root)."""

    def __init__(self, leaves: list[Leaf]) -> None:
        for leaf in leaves:
            if len(leaf.receipt_id) != 32 or len(leaf.sums) != SUMS or min(leaf.sums) < 0:
                raise ValueError("a leaf is a 32-byte name and non-negative sums")
        self.leaves = leaves
        level = [(leaf_digest(leaf), leaf.sums) for leaf in leaves]
        self._levels = [level]
        while len(level) > 1:
            above = []
            for i in range(0, len(level), 2):
                if i + 1 < len(level):
                    (left, left_sums), (right, right_sums) = level[i], level[i + 1]
                    sums = _add(left_sums, right_sums)
                    above.append((node_digest(left, right, sums), sums))
                else:
                    above.append(level[i])  # a lone node is carried up as it is
            level = above
            self._levels.append(level)

    @property
    def root(self) -> bytes:
        top = self._levels[-1]
        return top[0][0] if top else bytes(32)

    @property
    def sums(self) -> tuple[int, ...]:
        top = self._levels[-1]
        return top[0][1] if top else (0,) * SUMS

    def index_at(self, coefficients: Coefficients, point: int) -> int:
        """The leaf whose weight covers `point` (0 <= point < the root's weight)."""
        if not 0 <= point < weight(self.sums, coefficients):
            raise ValueError("the point is outside the tree's weight")
        index = 0
        for depth in range(len(self._levels) - 2, -1, -1):
            level = self._levels[depth]
            left = 2 * index
            if left + 1 >= len(level):  # a lone node, carried up
                index = left
                continue
            below = weight(level[left][1], coefficients)
            if point < below:
                index = left
            else:
                point -= below
                index = left + 1
        return index

    def prove(self, index: int) -> list[Sibling]:
        """The siblings of leaf `index`, from the leaf up."""
        path = []
        for level in self._levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                digest, sums = level[sibling]
                path.append(Sibling(digest, sums, is_left=sibling < index))
            index //= 2
        return path


def check_proof(
    leaf: Leaf,
    path: list[Sibling],
    *,
    root: bytes,
    sums: tuple[int, ...],
    coefficients: Coefficients,
    point: int,
) -> None:
    """Raises ProofError unless `path` leads from `leaf` to `root` (with `sums`), and the
    leaf covers `point` of the weight `coefficients` give."""
    if len(path) > MAX_DEPTH:
        raise ProofError("the proof is deeper than any tree")
    if len(leaf.receipt_id) != 32:
        raise ProofError("a malformed leaf")
    pack = _SUMS_BYTES.pack
    c0, c1, c2 = coefficients
    try:
        # Packing checks each amount (an unsigned 64-bit integer) before any arithmetic:
        # a peer's "sums" may be anything msgpack carries.
        digest = _leaf_hash(leaf.receipt_id, pack(*leaf.sums))
        t0, t1, t2 = leaf.sums
        own = c0 * t0 + c1 * t1 + c2 * t2
        before = 0
        for sibling in path:
            s0, s1, s2 = sibling.sums
            pack(s0, s1, s2)
            t0, t1, t2 = t0 + s0, t1 + s1, t2 + s2
            total = pack(t0, t1, t2)
            if sibling.is_left:
                before += c0 * s0 + c1 * s1 + c2 * s2
                digest = _node_hash(sibling.digest, digest, total)
            else:
                digest = _node_hash(digest, sibling.digest, total)
    except (struct.error, ValueError, TypeError):
        raise ProofError("a malformed leaf or sibling") from None
    if digest != root or (t0, t1, t2) != tuple(sums):
        raise ProofError("the proof does not lead to the summary's root")
    if not before <= point < before + own:
        raise ProofError("the proven leaf is not the one the point falls on")
