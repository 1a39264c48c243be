"""A server's published summary of its credit, and the sample of receipts it shows.

Each daemon stores its `Summary` in the DHT under `credit_key(model, peer_id)`, one of
`SHARDS` keys (a DHT key holds at most 512 subkeys), in its own signed subkey (nobody
else can write it): what it claims to have earned, the root of the Merkle
sum tree over its counted receipts (`volunteer.trust.ledger`), and its latest
`SAMPLE_SIZE` receipts as they were signed. A summary is a claim: the board shows what
an auditor made of it (`volunteer.trust.credit_audit`), never what it says.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import math

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from volunteer.swarm.dht_records import peer_id_from_owner
from volunteer.swarm.records import RecordError, check_model_name
from volunteer.transport.protocol import printable
from volunteer.trust.credit_tree import SUMS
from volunteer.trust.ledger import Built, Ledger
from volunteer.trust.receipts import MAX_RECEIPT_BYTES

SAMPLE_SIZE = 1
"""Receipts a summary shows, its latest (a record holds 4 KiB; a receipt takes about 800
bytes, and each costs every auditor a signature check)."""
SUMMARY_TTL_S = 1800.0
SHARDS = 32
"""Keys the summaries of one model are spread over: room for 16,384 servers."""
MAX_NAME_CHARS = 64
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)

logger = logging.getLogger(__name__)


class Summary(BaseModel):
    """What a server claims of its credit (see the module)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(min_length=1, max_length=128)
    public_name: str = Field(default="", max_length=MAX_NAME_CHARS * 2)
    as_of_s: float
    """When the tree was counted (wall clock): its recent credit is decayed to then."""
    receipts: int = Field(ge=0)
    root: bytes = Field(min_length=32, max_length=32)
    sums: tuple[int, ...]
    """The root's sums (`volunteer.trust.credit_tree.SUMS`): credit and recent credit in
    milli-credits, checks passed."""
    failed: int = Field(default=0, ge=0)
    clients: int = Field(default=0, ge=0)
    """Distinct clients that reported a passed check (the escrow's record)."""
    block_tokens: int = Field(default=0, ge=0)
    start: int = Field(default=0, ge=0)
    end: int = Field(default=0, ge=0)
    """The blocks it serves now (start == end: none)."""
    online_since_s: float = 0.0
    sample: list[bytes] = Field(default_factory=list, max_length=SAMPLE_SIZE)

    @field_validator("public_name")
    @classmethod
    def _printable_name(cls, name: str) -> str:
        return printable(name, max_chars=MAX_NAME_CHARS)

    @field_validator("as_of_s", "online_since_s")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @field_validator("sums")
    @classmethod
    def _sums(cls, sums: tuple[int, ...]) -> tuple[int, ...]:
        if len(sums) != SUMS or min(sums) < 0 or max(sums) >= 1 << 63:
            raise ValueError(f"must be {SUMS} non-negative sums")
        return sums

    @field_validator("sample")
    @classmethod
    def _bounded(cls, sample: list[bytes]) -> list[bytes]:
        if any(len(each) > MAX_RECEIPT_BYTES for each in sample):
            raise ValueError("a sampled receipt is too large")
        return sample


def credit_key(model: str, peer_id: str) -> str:
    """The DHT key under which `peer_id` publishes its credit summary for `model`."""
    shard = int.from_bytes(hashlib.sha256(peer_id.encode()).digest()[:4], "big") % SHARDS
    return shard_key(model, shard)


def shard_key(model: str, shard: int) -> str:
    return f"{check_model_name(model)}.credit.{shard}"


async def publish_on_node(
    node: DHTNode, summary: Summary, *, owner: bytes, timeout_s: float
) -> bool:
    """Stores this peer's summary (its subkey); False on timeout or refusal."""
    try:
        return bool(
            await asyncio.wait_for(
                node.store(
                    credit_key(summary.model, peer_id_from_owner(owner)),
                    summary.model_dump(),
                    get_dht_time() + SUMMARY_TTL_S,
                    subkey=owner,
                ),
                timeout=timeout_s,
            )
        )
    except _TIMEOUTS:
        return False


async def read_on_node(node: DHTNode, model: str, *, timeout_s: float) -> dict[str, Summary] | None:
    """Every live summary of `model`'s servers, by peer id, from all shards in one
    look-up; malformed ones, ones of another model and ones under the wrong shard are
    dropped (None: the DHT did not answer in time)."""
    keys = [shard_key(model, shard) for shard in range(SHARDS)]
    try:
        # As `get(latest=True)`: wait for every holder, not the first answer.
        found = await asyncio.wait_for(
            node.get_many(keys, sufficient_expiration_time=float("inf")), timeout=timeout_s
        )
    except _TIMEOUTS:
        return None
    now = get_dht_time()
    read = {}
    for key, shard in found.items():
        if shard is None or not isinstance(shard.value, dict):
            continue
        for subkey, item in shard.value.items():
            if item.expiration_time <= now:
                continue
            try:
                peer_id = peer_id_from_owner(subkey)
                summary = Summary.model_validate(item.value)
                if summary.model == model and credit_key(model, peer_id) == key:
                    read[peer_id] = summary
            except (RecordError, ValueError, ValidationError) as exc:
                logger.debug("dropped a credit summary under %r: %s", subkey, exc)
    return read


def summary_of(
    ledger: Ledger,
    built: Built,
    *,
    public_name: str = "",
    blocks: tuple[int, int] = (0, 0),
    online_since_s: float = 0.0,
) -> Summary:
    """The summary of `ledger`'s receipts as counted in `built`, showing the latest."""
    latest = sorted(ledger.works(), key=lambda w: w.closed_s)[-SAMPLE_SIZE:]
    sample = [ledger.signed(w.receipt_id) for w in latest]
    return Summary(
        model=ledger.model,
        public_name=public_name,
        as_of_s=built.as_of_s,
        receipts=len(ledger),
        root=built.tree.root,
        sums=built.tree.sums,
        failed=built.checks.failed,
        clients=built.checks.clients,
        block_tokens=built.block_tokens,
        start=blocks[0],
        end=blocks[1],
        online_since_s=online_since_s,
        sample=[each.to_bytes() for each in sample if each is not None],
    )
