"""The record validator every honest node installs: our DHT holds only what we write.

hivemind's `RSASignatureValidator` only checks records that carry an owner marker; it
accepts anything else, and a plain value with a later expiration replaces a whole
dictionary of signed subkeys, so one unsigned `b"x"` under a block key hid every server
of that block. `SwarmRecordValidator` refuses, on store and on read:

- plain values (no subkey): every record of ours is a dictionary of per-peer subkeys;
- subkeys that are not exactly one owner marker (`[owner:<ssh-rsa key>]`): hivemind
  only looks for the marker *inside* a subkey, so one key could sign any number of
  subkeys with junk around its marker and flood a key;
- values over `MAX_RECORD_BYTES` and subkeys over `MAX_SUBKEY_BYTES` (a huge RSA key
  is also costly to verify);
- expirations past `now + MAX_RECORD_LIFETIME_S`, or not finite: a far-future record
  would outlive every honest re-announce and never leave;
- then, like hivemind's validator, a signature that does not match the marker's key.

hivemind hands a validator the key's DHTID (a hash), not the key's text, so it cannot
tell our keys from others by name: it applies to every key of the swarm's DHT, and every
key we add must follow the same scheme (signed subkeys, bounded). How many subkeys a key
holds is bounded where records are stored (`volunteer.swarm.dht_storage`): a validator
sees one record at a time.
"""

from __future__ import annotations

import logging
import math
import re

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

logger = logging.getLogger(__name__)

RECORD_TTL_PERIODS = 3.0
"""A re-announced record lives this many periods, so one late or lost beat is forgiven."""
MAX_ANNOUNCE_PERIOD_S = 3600.0
"""The longest announce period a server may use; the `announce_period_s` setting's range
must stay within it (a test checks), or honest records would be refused as far-future."""
CLOCK_SLACK_S = 300.0
"""Allowance for honest peers' clocks running ahead of ours (DHT times are wall clocks)."""
MAX_RECORD_LIFETIME_S = RECORD_TTL_PERIODS * MAX_ANNOUNCE_PERIOD_S + CLOCK_SLACK_S
"""No record of ours expires later than this from now."""
MAX_RECORD_BYTES = 4096
"""A signed record's bytes: the largest valid `ServerInfo` with its signature takes about
1.3 KiB; the rest leaves room for fields a newer version adds."""
MAX_SUBKEY_BYTES = 1024
"""A serialized owner marker: an RSA-2048 key takes about 400 bytes."""

_STRICT_OWNER_RE = re.compile(rb"\[owner:ssh-rsa [A-Za-z0-9+/]+={0,2}\]")
"""One owner marker and nothing else (hivemind's own pattern, `.+?`, also spans junk)."""


class SwarmRecordValidator(RSASignatureValidator):
    """hivemind's signature validator, plus the rules above for every record.

    Args:
        private_key: signs this peer's records; None for a reader that signs nothing
            (hivemind then uses a process-wide key that owns no record).
    """

    def __init__(self, private_key: RSAPrivateKey | None = None) -> None:
        super().__init__(private_key)

    def validate(self, record: DHTRecord) -> bool:
        problem = record_problem(record)
        if problem is not None:
            # Debug only: a hostile peer could otherwise fill the log at will.
            logger.debug("refused a DHT record: %s", problem)
            return False
        return super().validate(record)


def record_problem(record: DHTRecord) -> str | None:
    """Why `record` breaks the rules of our key space, or None if it keeps them
    (the signature is checked separately)."""
    if record.subkey == DHTProtocol.IS_REGULAR_VALUE:
        return "a plain value: only signed per-peer subkeys are stored"
    if len(record.subkey) > MAX_SUBKEY_BYTES:
        return f"a subkey of {len(record.subkey)} bytes (at most {MAX_SUBKEY_BYTES})"
    if len(record.value) > MAX_RECORD_BYTES:
        return f"a value of {len(record.value)} bytes (at most {MAX_RECORD_BYTES})"
    if not _is_owner_marker(record.subkey):
        return "a subkey that is not exactly one owner marker"
    expiration = record.expiration_time
    if not math.isfinite(expiration) or expiration > get_dht_time() + MAX_RECORD_LIFETIME_S:
        return f"an expiration {expiration!r} past now + {MAX_RECORD_LIFETIME_S:g} s"
    return None


def _is_owner_marker(subkey_bytes: bytes) -> bool:
    try:
        subkey = MSGPackSerializer.loads(subkey_bytes)
    except Exception:  # msgpack raises several types on hostile bytes
        return False
    return isinstance(subkey, bytes) and _STRICT_OWNER_RE.fullmatch(subkey) is not None
