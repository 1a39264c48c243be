"""Accusations: a peer's public, signed claim that a server computed a step wrong.

A peer that proves a server wrong (a check its third computation decided, see
`volunteer.client.verification`) publishes an `Accusation` in the DHT under
`accusations_key(model)`, in its own signed subkey (the DHT's owner marker: nobody
else can write it, and the subkey names the accuser). It holds its last
`MAX_PER_ACCUSER` accusations, each naming the accused, the blocks and the sha256 of
the evidence (`volunteer.trust.evidence`), which the accuser serves to anyone who asks
(`volunteer.daemon.accusation_service`). The evidence, not the accusation, convicts:
whoever reads an accusation fetches the evidence, checks it is signed by the accused,
and recomputes the step itself. Its `kind` says which evidence it names: a serving
step's (`volunteer.trust.evidence`) or a training share's (`volunteer.training.evidence`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
from typing import Literal

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from volunteer.swarm.dht_records import read_owned_on_node
from volunteer.swarm.records import RecordError, check_model_name
from volunteer.transport.protocol import printable

MAX_PER_ACCUSER = 6
"""Accusations one peer keeps published: its latest (a record holds 4 KiB)."""
MAX_REASON_CHARS = 160
ACCUSATION_TTL_S = 3600.0
"""How long a published accusation lives: enough for every daemon to judge it."""
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)

logger = logging.getLogger(__name__)


class Accusation(BaseModel):
    """One claim: `accused` answered a step of blocks [start, end) wrong."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: Literal["serving", "training"] = "serving"
    accused: str = Field(min_length=1, max_length=128)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    reason: str = Field(default="", max_length=MAX_REASON_CHARS * 2)
    filed_s: float
    """When it was filed (wall clock)."""
    evidence: str = Field(pattern=r"^[0-9a-f]{64}$")
    """The evidence's sha256 (`volunteer.trust.evidence.evidence_id`)."""

    @field_validator("reason")
    @classmethod
    def _printable_reason(cls, reason: str) -> str:
        return printable(reason, max_chars=MAX_REASON_CHARS)

    @field_validator("filed_s")
    @classmethod
    def _finite(cls, filed_s: float) -> float:
        if not math.isfinite(filed_s):
            raise ValueError("must be finite")
        return filed_s


def accusations_key(model: str) -> str:
    """The DHT key of the accusations about `model`'s servers."""
    return f"{check_model_name(model)}.accusations"


async def publish_on_node(
    node: DHTNode,
    model: str,
    accusations: list[Accusation],
    *,
    owner: bytes,
    timeout_s: float,
) -> bool:
    """Stores this peer's latest accusations (its whole subkey) in the DHT; False on
    timeout or refusal."""
    value = [each.model_dump() for each in accusations[-MAX_PER_ACCUSER:]]
    try:
        return bool(
            await asyncio.wait_for(
                node.store(
                    accusations_key(model),
                    value,
                    get_dht_time() + ACCUSATION_TTL_S,
                    subkey=owner,
                ),
                timeout=timeout_s,
            )
        )
    except _TIMEOUTS:
        return False


async def read_on_node(
    node: DHTNode, model: str, *, timeout_s: float
) -> list[tuple[str, Accusation]] | None:
    """Every (accuser, accusation) published about `model`'s servers; malformed ones are
    dropped (None: the DHT did not answer in time)."""
    found = await read_owned_on_node(node, accusations_key(model), timeout_s=timeout_s)
    if found is None:
        return None
    read = []
    for accuser, value in found:
        try:
            read.extend((accuser, each) for each in _parse(value))
        except (RecordError, ValueError, ValidationError) as exc:
            logger.debug("dropped accusations of %s: %s", accuser, exc)
    return read


def _parse(value: object) -> list[Accusation]:
    if not isinstance(value, list) or len(value) > MAX_PER_ACCUSER:
        raise ValueError(f"not a list of at most {MAX_PER_ACCUSER} accusations")
    return [Accusation.model_validate(each) for each in value]
