"""Announcing servers in hivemind's DHT and reading who serves what.

Each server stores its `ServerInfo` under `block_key(model, i)` for every block `i` of its
span, with a subkey that carries its RSA public key in hivemind's owner marker
(`[owner:ssh-rsa ...]`). hivemind's `RSASignatureValidator` then refuses any change to
that subkey not signed by the matching private key, so nobody can overwrite another
peer's record. The same RSA key is the peer's libp2p identity, so a reader derives the
peer id from the owner marker itself: a record cannot claim somebody else's peer id.

The daemon and the client run a `DHTNode` on their own loop and call the `*_on_node`
coroutines. Fetching (`fetch_raw`) and checking (`snapshot_from_raw`) are separate steps so a
caller whose node runs in another process fetches there and checks (and logs drops) in its
own (the tests' sync wrappers in `tests/swarm/dht_helpers.py` do).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.proto import crypto_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from volunteer.swarm.dht_validator import RECORD_TTL_PERIODS, SwarmRecordValidator
from volunteer.swarm.records import (
    RecordError,
    ServerInfo,
    SwarmSnapshot,
    block_key,
    check_model_name,
)
from volunteer.transport.commitment import rsa_peer_id

logger = logging.getLogger(__name__)

_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX, re.DOTALL)
# Before Python 3.11 these three were different classes.
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)

RawRecords = dict[str, list[tuple[Any, Any, float]]]
"""Block key -> (subkey, value, expiration time) as stored, before any checks."""


def make_validator(identity_key: RSAPrivateKey | None = None) -> SwarmRecordValidator:
    """The record validator that signs with `identity_key` (None: a reader that signs
    nothing) and refuses what our key space does not hold
    (`volunteer.swarm.dht_validator`)."""
    return SwarmRecordValidator(identity_key)


def owner_marker(identity_key: RSAPrivateKey) -> bytes:
    """The subkey under which this key's owner announces (equal to the validator's marker)."""
    public = identity_key.get_public_key().to_bytes()
    return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", public)


def encode_p2p_identity(identity_key: RSAPrivateKey) -> bytes:
    """`identity_key` as the libp2p private key file that `P2P.create(identity_path=...)` reads."""
    message = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=identity_key.to_bytes())
    return message.SerializeToString()


def peer_id_from_owner(subkey: object) -> str:
    """The base58 peer id of the RSA public key inside an owner marker subkey.

    Raises:
        RecordError: `subkey` is not exactly one well-formed owner marker.
    """
    if not isinstance(subkey, bytes):
        raise RecordError(f"subkey must be bytes with an owner marker, got {type(subkey).__name__}")
    found = _OWNER_RE.fullmatch(subkey)
    if found is None:
        raise RecordError("subkey is not an owner marker [owner:<ssh-rsa key>]")
    try:
        public_key = serialization.load_ssh_public_key(found.group(1))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise RecordError(f"owner marker holds no valid public key ({exc})") from None
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise RecordError("owner marker holds a non-RSA key; peer ids here are RSA keys")
    der = public_key.public_bytes(
        encoding=serialization.Encoding.DER,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return rsa_peer_id(der)


def record_ttl_s(period_s: float) -> float:
    """How long a record announced every `period_s` seconds should live."""
    return RECORD_TTL_PERIODS * period_s


async def announce_on_node(
    node: DHTNode,
    info: ServerInfo,
    *,
    owner: bytes,
    expiration_s: float,
    timeout_s: float,
    blocks: range | None = None,
) -> bool:
    """Stores `info` under every block of its span, signed, on a DHTNode of this loop.

    Args:
        node: a running node created with this peer's `make_validator`.
        info: the record to announce; its span says which blocks.
        owner: `owner_marker(identity_key)` of the node's key.
        expiration_s: how long the record lives from now.
        timeout_s: how long to wait for the DHT.
        blocks: only these blocks of the span (e.g. those a moving server leaves).

    Returns:
        Whether every block's record was stored; False on timeout or refusal.
    """
    indices = range(info.start, info.end) if blocks is None else blocks
    if not set(indices) <= set(range(info.start, info.end)):
        raise ValueError(f"blocks {indices} are not all inside [{info.start}, {info.end})")
    keys = [block_key(info.model, index) for index in indices]
    expiration = get_dht_time() + expiration_s
    try:
        stored = await asyncio.wait_for(
            node.store_many(
                keys, [info.to_wire()] * len(keys), expiration, subkeys=[owner] * len(keys)
            ),
            timeout=timeout_s,
        )
    except _TIMEOUTS:
        logger.warning("announce of %s [%d, %d) timed out", info.model, info.start, info.end)
        return False
    # hivemind reports each stored (key, subkey) pair separately.
    return all(stored.get((key, owner)) for key in keys)


async def read_snapshot_on_node(
    node: DHTNode, model: str, num_blocks: int, *, timeout_s: float
) -> SwarmSnapshot:
    """Reads every block's servers of `model` from a DHTNode of this loop (one batched get).

    Raises:
        TimeoutError: the DHT did not answer within `timeout_s`.
    """
    raw = await fetch_raw(node, model, num_blocks, timeout_s=timeout_s)
    if raw is None:
        raise TimeoutError(f"reading the swarm of {model} took over {timeout_s:g} s")
    return snapshot_from_raw(model, num_blocks, raw)


def snapshot_from_raw(model: str, num_blocks: int, raw: RawRecords) -> SwarmSnapshot:
    """Checks every stored record; keeps the valid, unexpired ones, logs and drops the rest."""
    now = get_dht_time()
    entries = []
    for index, key in enumerate(_block_keys(model, num_blocks)):
        for subkey, value, expiration in raw.get(key, ()):
            if expiration <= now:
                continue
            who = _describe_subkey(subkey)
            try:
                peer_id = peer_id_from_owner(subkey)
                who = peer_id
                info = ServerInfo.from_wire(value)
                _check_fits_block(info, model, index)
            except RecordError as exc:
                logger.warning("dropped the record of peer %s under %s: %s", who, key, exc)
                continue
            entries.append((index, peer_id, info))
    return SwarmSnapshot.build(model, num_blocks, entries)


def _block_keys(model: str, num_blocks: int) -> list[str]:
    check_model_name(model)
    return [block_key(model, index) for index in range(num_blocks)]


def _check_fits_block(info: ServerInfo, model: str, index: int) -> None:
    # A record under the wrong key is either stale junk or an attempt to appear elsewhere.
    if info.model != model:
        raise RecordError(f"record is for model {info.model!r}, not {model!r}")
    if not info.start <= index < info.end:
        raise RecordError(f"span [{info.start}, {info.end}) does not contain block {index}")


def _describe_subkey(subkey: object) -> str:
    # Unverified input: show a short prefix only, never a megabyte of garbage.
    text = repr(subkey)
    return text if len(text) <= 48 else text[:45] + "..."


async def fetch_raw(
    node: DHTNode, model: str, num_blocks: int, *, timeout_s: float
) -> RawRecords | None:
    """Every stored record under the blocks of `model`, unchecked (see `snapshot_from_raw`).

    Returns:
        The records by block key, or None when the DHT did not answer within `timeout_s`
        (None, not an exception: in hivemind's child process a raised one is logged as a crash).

    Raises:
        RecordError: `model` is not a valid model name.
    """
    keys = _block_keys(model, num_blocks)
    # sufficient_expiration_time=inf asks every replica and merges their subkeys; the
    # default stops at the first replica that has any value and can miss servers.
    try:
        found = await asyncio.wait_for(
            node.get_many(keys, sufficient_expiration_time=float("inf")), timeout=timeout_s
        )
    except _TIMEOUTS:
        return None
    raw: RawRecords = {}
    for key, entry in found.items():
        if entry is None:
            continue
        if not isinstance(entry.value, dict):
            logger.warning("ignored %s: it holds a plain value, not per-peer records", key)
            continue
        raw[key] = [
            (subkey, item.value, item.expiration_time) for subkey, item in entry.value.items()
        ]
    return raw


async def read_owned_on_node(
    node: DHTNode, key: str, *, timeout_s: float
) -> list[tuple[str, object]] | None:
    """Each unexpired value under `key` with the peer id of the subkey's owner, values
    unchecked; None when the DHT did not answer within `timeout_s`. A subkey without a
    valid owner marker is dropped (logged at debug level: strangers write them)."""
    try:
        found = await asyncio.wait_for(node.get(key, latest=True), timeout=timeout_s)
    except _TIMEOUTS:
        return None
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    owned = []
    for subkey, item in found.value.items():
        if item.expiration_time <= now or item.value is None:
            continue
        try:
            owned.append((peer_id_from_owner(subkey), item.value))
        except (RecordError, ValueError) as exc:
            logger.debug("dropped a record under %s, %s: %s", key, _describe_subkey(subkey), exc)
    return owned
