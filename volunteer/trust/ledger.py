"""A server's receipts (`volunteer.trust.receipts`) and the credit they earn it.

The receipts are kept in a SQLite file in the data folder (0600), so credit survives
restarts; in memory without a path. A receipt is stored once: by its name, and by its
client, session and kind (a client cannot be paid twice for one session by signing it
again). Next to each the server keeps its own count of what it served in that session.

`tree` counts the receipts (`volunteer.scheduler.credit.counted`) and builds the Merkle
sum tree (`volunteer.trust.credit_tree`) a summary commits to; `proof_at` answers an
auditor's draw from it.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable
from pathlib import Path

from volunteer.errors import VolunteerError
from volunteer.scheduler.credit import (
    DAY_S,
    CheckTally,
    Counted,
    Work,
    check_tally,
    counted,
    decayed_milli,
)
from volunteer.trust.credit_tree import (
    CREDIT,
    PASSED,
    RECENT,
    SUMS,
    Coefficients,
    Leaf,
    Sibling,
    SumTree,
)
from volunteer.trust.receipts import Receipt, SignedReceipt
from volunteer.trust.sqlite_file import open_private_db

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS receipts (id TEXT PRIMARY KEY, client TEXT NOT NULL,"
    " session_id TEXT NOT NULL, kind TEXT NOT NULL, start INTEGER NOT NULL,"
    " end_ INTEGER NOT NULL, tokens INTEGER NOT NULL, closed_s REAL NOT NULL,"
    " checked INTEGER NOT NULL, failed INTEGER NOT NULL, served INTEGER NOT NULL,"
    " body BLOB NOT NULL, signature BLOB NOT NULL, client_key BLOB NOT NULL,"
    " UNIQUE (client, session_id, kind))"
)


class LedgerError(VolunteerError):
    """The receipts file cannot be opened, read or written."""


@dataclasses.dataclass(frozen=True)
class Built:
    """A tree over the receipts as counted at `as_of_s`."""

    as_of_s: float
    tree: SumTree
    checks: CheckTally
    block_tokens: int


class Ledger:
    """The receipts of one server (see the module). Not thread-safe: one event loop
    owns it."""

    def __init__(
        self, path: Path | None, *, server: str, model: str, params_per_block: int
    ) -> None:
        self.server, self.model, self.params_per_block = server, model, params_per_block
        self._works: dict[str, Work] = {}
        self._served: dict[str, int] = {}
        self._sessions: set[tuple[str, str, str]] = set()
        self._db: sqlite3.Connection | None = None
        self._built: Built | None = None
        self._kept: dict[str, SignedReceipt] = {}
        """The receipts themselves, where no file keeps them."""
        if path is not None:
            self._db = _open(path)
            rows = self._db.execute(
                "SELECT id, client, session_id, kind, start, end_, tokens, closed_s,"
                " checked, failed, served FROM receipts"
            )
            for row in rows:
                self._remember(row[0], row[1], row[2], row[3], row[5] - row[4], *row[6:])

    def __len__(self) -> int:
        return len(self._works)

    def has_session(self, client: str, session_id: str, kind: str) -> bool:
        return (client, session_id, kind) in self._sessions

    def add(self, signed: SignedReceipt, receipt: Receipt, *, served: int) -> bool:
        """Keeps a checked receipt (False: this one, or one for its session, is kept
        already). `served` is the server's own count of the session's tokens."""
        if signed.id in self._works or self.has_session(
            receipt.client, receipt.session_id, receipt.kind
        ):
            return False
        if self._db is not None:
            try:
                with self._db:
                    self._db.execute(
                        "INSERT INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            signed.id, receipt.client, receipt.session_id, receipt.kind,
                            receipt.start, receipt.end, receipt.tokens, receipt.closed_s,
                            receipt.checked, receipt.failed, served,
                            signed.body, signed.signature, signed.client_key,
                        ),
                    )  # fmt: skip
            except sqlite3.IntegrityError:
                return False
            except sqlite3.Error as exc:
                raise LedgerError(f"cannot write the receipts file: {exc}") from exc
        if self._db is None:
            self._kept[signed.id] = signed
        self._remember(
            signed.id, receipt.client, receipt.session_id, receipt.kind, receipt.blocks,
            receipt.tokens, receipt.closed_s, receipt.checked, receipt.failed, served,
        )  # fmt: skip
        return True

    def works(self) -> list[Work]:
        return list(self._works.values())

    def served(self, receipt_id: str) -> int:
        return self._served.get(receipt_id, 0)

    def signed(self, receipt_id: str) -> SignedReceipt | None:
        if self._db is None:
            return self._kept.get(receipt_id)
        row = self._db.execute(
            "SELECT body, signature, client_key FROM receipts WHERE id = ?", (receipt_id,)
        ).fetchone()
        return None if row is None else SignedReceipt(*row)

    def build(self, as_of_s: float, *, is_banned: Callable[[str], bool]) -> Built:
        """The tree over every receipt as counted at `as_of_s` (kept until the next)."""
        works = self.works()
        found = counted(
            works, server=self.server, params_per_block=self.params_per_block, is_banned=is_banned
        )
        leaves = [_leaf(each, as_of_s) for each in found]
        block_tokens = sum(w.blocks * w.tokens for w in works if w.client != self.server)
        checks = check_tally(works, server=self.server)
        self._built = Built(as_of_s, SumTree(leaves), checks, block_tokens)
        return self._built

    @property
    def built(self) -> Built | None:
        return self._built

    def daily_credit(self, *, days: int, now_s: float) -> list[float]:
        """Credit counted per UTC day, the last `days` days up to today (oldest first)."""
        found = counted(self.works(), server=self.server, params_per_block=self.params_per_block)
        today = int(now_s // DAY_S)
        series = [0.0] * days
        for each in found:
            age = today - int(each.closed_s // DAY_S)
            if 0 <= age < days:
                series[days - 1 - age] += each.milli / 1000
        return series

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _remember(
        self, receipt_id: str, client: str, session_id: str, kind: str, blocks: int,
        tokens: int, closed_s: float, checked: int, failed: int, served: int,
    ) -> None:  # fmt: skip
        self._works[receipt_id] = Work(
            receipt_id, client, kind, blocks, tokens, closed_s, checked, failed
        )
        self._served[receipt_id] = served
        self._sessions.add((client, session_id, kind))
        self._built = None


def _leaf(each: Counted, as_of_s: float) -> Leaf:
    sums = [0] * SUMS
    sums[CREDIT] = each.milli
    sums[RECENT] = decayed_milli(each.milli, each.closed_s, as_of_s)
    sums[PASSED] = each.passed
    return Leaf(bytes.fromhex(each.receipt_id), tuple(sums))


def proof_at(built: Built, coefficients: Coefficients, point: int) -> tuple[Leaf, list[Sibling]]:
    index = built.tree.index_at(coefficients, point)
    return built.tree.leaves[index], built.tree.prove(index)


def _open(path: Path) -> sqlite3.Connection:
    return open_private_db(path, _SCHEMA, LedgerError, "receipts file")
