"""Credit for verified work: the formula, the anti-farming bounds and the recent average.

**Formula.** A receipt (`volunteer.trust.receipts`) earns, in credits::

    blocks x tokens x params_per_block x KIND_WEIGHT[kind] / PARAMS_PER_CREDIT

so one credit is 10^9 parameter-tokens of forward work (about 2 GFLOP), whatever the
model: a block of a large model earns more per token than one of a small model, as AI
Horde weighs kudos by model size. Backward work counts `KIND_WEIGHT["backward"]` times
(it costs about twice a forward pass); a training stage's pass `KIND_WEIGHT["training"]`
times (forward, its recomputation, and backward). Amounts are kept in integer milli-credits, so
that every peer adding the same receipts gets the same sums.

**What counts.** Nothing from the server's own key (self-dealt), from a client the
counting peer has banned, or for work a client found wrong (a receipt reporting a failed
check earns nothing). Per client and UTC day, at most `CLIENT_DAY_CAP` credits count
(receipts in time order, the rest cut): a farm of one identity is bounded.

**Escrow.** A new identity's credit is held (BOINC's probation, AI Horde's escrow) until
its receipts record `ESCROW_CHECKS` passed checks from `ESCROW_CLIENTS` distinct clients
and under one failed in `ESCROW_FAILED_RATIO`; then all of it is released, and later
credit counts at once. A peer that is banned while its credit is held forfeits it.

**Recent average** (BOINC's RAC): each credit decays with a half-life of one week; the
decayed sum times ln 2 per half-life is credits per day, which equals a steady daily rate
and halves in a week without new work.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

PARAMS_PER_CREDIT = 1e9
KIND_WEIGHT = {"inference": 1.0, "forward": 1.0, "backward": 2.0, "training": 4.0}
MILLI = 1000
DAY_S = 86_400.0
HALF_LIFE_S = 7 * DAY_S
CLIENT_DAY_CAP = 5_000.0
"""Credits one client may give one server in a UTC day: about 100,000 tokens through a
third of a 7B model, far more than one person chats."""
ESCROW_CHECKS = 16
ESCROW_CLIENTS = 2
ESCROW_FAILED_RATIO = 20


@dataclasses.dataclass(frozen=True)
class Work:
    """What a receipt says, as the credit needs it."""

    receipt_id: str
    client: str
    kind: str
    blocks: int
    tokens: int
    closed_s: float
    checked: int = 0
    failed: int = 0


@dataclasses.dataclass(frozen=True)
class Counted:
    """One receipt's credit, in milli-credits, after the bounds."""

    receipt_id: str
    closed_s: float
    milli: int
    passed: int
    """Checks the receipt reports passed (for the escrow's record)."""


def raw_milli(*, blocks: int, tokens: int, kind: str, params_per_block: int) -> int:
    """A receipt's credit before any bound, in milli-credits (0 for an unknown kind)."""
    weight = KIND_WEIGHT.get(kind, 0.0)
    return math.floor(blocks * tokens * params_per_block * weight * MILLI / PARAMS_PER_CREDIT)


def counted(
    works: Iterable[Work],
    *,
    server: str,
    params_per_block: int,
    is_banned: Callable[[str], bool] = lambda peer: False,
) -> list[Counted]:
    """Each receipt's credit after the bounds (see the module), in time order."""
    cap = int(CLIENT_DAY_CAP * MILLI)
    given: dict[tuple[str, int], int] = {}
    found = []
    for work in sorted(works, key=lambda w: (w.closed_s, w.receipt_id)):
        milli = raw_milli(
            blocks=work.blocks,
            tokens=work.tokens,
            kind=work.kind,
            params_per_block=params_per_block,
        )
        if work.client == server or work.failed > 0 or is_banned(work.client):
            milli = 0
        day = (work.client, int(work.closed_s // DAY_S))
        milli = max(0, min(milli, cap - given.get(day, 0)))
        given[day] = given.get(day, 0) + milli
        passed = 0 if work.client == server else max(0, work.checked - work.failed)
        found.append(Counted(work.receipt_id, work.closed_s, milli, passed))
    return found


def decayed_milli(milli: int, closed_s: float, as_of_s: float) -> int:
    """`milli` decayed from `closed_s` to `as_of_s` (a future time counts as now)."""
    age = max(0.0, as_of_s - closed_s)
    return math.floor(milli * 2.0 ** (-age / HALF_LIFE_S))


def recent_average(recent_milli: int) -> float:
    """Credits per day from a decayed sum (see the module)."""
    return recent_milli / MILLI * math.log(2) * DAY_S / HALF_LIFE_S


@dataclasses.dataclass(frozen=True)
class CheckTally:
    """A server's record of checks, from its receipts."""

    passed: int = 0
    failed: int = 0
    clients: int = 0
    """Distinct clients that reported a passed check."""


def is_released(checks: CheckTally) -> bool:
    """Whether a server's record lets its credit out of escrow."""
    return (
        checks.passed >= ESCROW_CHECKS
        and checks.clients >= ESCROW_CLIENTS
        and checks.failed * ESCROW_FAILED_RATIO < checks.passed
    )


def check_tally(works: Iterable[Work], *, server: str) -> CheckTally:
    passed = failed = 0
    clients = set()
    for work in works:
        if work.client == server:
            continue
        passed += max(0, work.checked - work.failed)
        failed += work.failed
        if work.checked > work.failed:
            clients.add(work.client)
    return CheckTally(passed, failed, len(clients))


@dataclasses.dataclass(frozen=True)
class Standing:
    """What the board shows of a server's credit (credits, not milli)."""

    total: float
    """All credit counted, held or not."""
    recent_average: float
    held: float
    """Of `total`, what escrow holds (0 once released)."""
    forfeited: bool = False


def standing_of(total_milli: int, recent_milli: int, *, released: bool, banned: bool) -> Standing:
    """A server's credit on the board: escrow held until released, lost on a ban."""
    total = total_milli / MILLI
    average = recent_average(recent_milli)
    if released:
        return Standing(total, average, 0.0)
    if banned:
        return Standing(0.0, 0.0, 0.0, forfeited=True)
    return Standing(total, average, total)
