"""The rules of our key space (`volunteer.swarm.dht_validator`), record by record, and the
bounded storage that caps subkeys per key and records per node."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from volunteer.errors import SettingsError
from volunteer.paths import Paths
from volunteer.settings import Settings
from volunteer.swarm.dht_records import make_validator, owner_marker
from volunteer.swarm.dht_storage import RECOUNT_EVERY_S, BoundedDHTStorage
from volunteer.swarm.dht_validator import (
    MAX_ANNOUNCE_PERIOD_S,
    MAX_RECORD_BYTES,
    MAX_RECORD_LIFETIME_S,
    record_problem,
)
from volunteer.swarm.records import ServerInfo, ServerState, block_key

KEY = RSAPrivateKey()
VALIDATOR = make_validator(KEY)
KEY_ID = DHTID.generate(source=block_key("m", 0)).to_bytes()


def _info() -> dict:
    return ServerInfo(
        state=ServerState.ONLINE,
        start=0,
        end=1,
        throughput=1.0,
        dtype="float32",
        cache_tokens_left=1,
        version="0.1.0",
        model="m",
    ).to_wire()


def _signed(subkey: object, value: object, expiration: float) -> DHTRecord:
    record = DHTRecord(
        KEY_ID, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration
    )
    signed = VALIDATOR.sign_value(record)
    return DHTRecord(record.key, record.subkey, signed, expiration)


def test_an_honest_record_passes() -> None:
    record = _signed(owner_marker(KEY), _info(), get_dht_time() + 90)
    assert record_problem(record) is None
    assert VALIDATOR.validate(record)


@pytest.mark.parametrize(
    ("subkey", "value", "lifetime", "problem"),
    [
        (None, b"x", 60.0, "plain value"),
        (b"someone", _info(), 60.0, "not exactly one owner marker"),
        (owner_marker(KEY) + b"#1", _info(), 60.0, "not exactly one owner marker"),
        (b"[owner:" + b"A" * 2000 + b"]", _info(), 60.0, "a subkey of"),
        (owner_marker(KEY), {"pad": "x" * MAX_RECORD_BYTES}, 60.0, "a value of"),
        (owner_marker(KEY), _info(), MAX_RECORD_LIFETIME_S + 60, "an expiration"),
        (owner_marker(KEY), _info(), float("inf"), "an expiration"),
    ],
)
def test_records_outside_our_key_space_are_refused(
    subkey: object, value: object, lifetime: float, problem: str
) -> None:
    if subkey is None:
        plain = MSGPackSerializer.dumps(value)
        record = DHTRecord(KEY_ID, DHTProtocol.IS_REGULAR_VALUE, plain, get_dht_time() + lifetime)
    else:
        record = _signed(subkey, value, get_dht_time() + lifetime)
    assert problem in (record_problem(record) or "")
    assert not VALIDATOR.validate(record)


def test_a_forged_signature_is_still_refused() -> None:
    # Our rules come on top of hivemind's signature check, not instead of it.
    record = _signed(owner_marker(KEY), _info(), get_dht_time() + 60)
    moved = DHTRecord(KEY_ID, record.subkey, record.value, record.expiration_time + 1)
    assert record_problem(moved) is None
    assert not VALIDATOR.validate(moved)


def test_the_announce_period_setting_stays_within_the_expiration_cap(tmp_path: Path) -> None:
    paths = Paths.resolve(home=tmp_path, env={"VOLUNTEER_CACHE_DIR": str(tmp_path / "cache")})
    longest = Settings.build(paths=paths, env={}, flags={"announce_period_s": "3600"})
    assert longest.announce_period_s <= MAX_ANNOUNCE_PERIOD_S
    with pytest.raises(SettingsError):
        Settings.build(
            paths=paths, env={}, flags={"announce_period_s": str(MAX_ANNOUNCE_PERIOD_S + 1)}
        )


def test_storage_refuses_new_subkeys_past_the_cap_and_keeps_refreshing_old_ones() -> None:
    storage = BoundedDHTStorage(max_subkeys_per_key=3, max_records=100)
    key, later = DHTID.generate(source="k"), get_dht_time() + 60
    assert all(storage.store_subkey(key, f"s{i}", b"v", later) for i in range(3))
    assert not storage.store_subkey(key, "flood", b"v", later + 1000)
    assert storage.store_subkey(key, "s0", b"v2", later + 1)
    held = storage.get(key).value
    assert sorted(subkey for subkey, _ in held.items()) == ["s0", "s1", "s2"]


def test_storage_refuses_new_records_past_the_total_cap() -> None:
    storage = BoundedDHTStorage(max_subkeys_per_key=10, max_records=4)
    now = get_dht_time()
    for i in range(4):
        assert storage.store_subkey(DHTID.generate(source=f"k{i}"), "s", b"v", now + 60)
    assert not storage.store_subkey(DHTID.generate(source="k-new"), "s", b"v", now + 60)
    assert not storage.store_subkey(DHTID.generate(source="k0"), "other", b"v", now + 60)
    assert storage.store_subkey(DHTID.generate(source="k0"), "s", b"v2", now + 61)


def test_a_full_storage_counts_its_records_at_most_once_per_period() -> None:
    now = [0.0]
    storage = BoundedDHTStorage(max_subkeys_per_key=10, max_records=4, clock=lambda: now[0])
    soon, later = get_dht_time() + 0.5, get_dht_time() + 60
    for i in range(4):
        assert storage.store_subkey(DHTID.generate(source=f"k{i}"), "s", b"v", soon)
    refused = [
        storage.store_subkey(DHTID.generate(source=f"x{i}"), "s", b"v", later) for i in range(1000)
    ]
    assert not any(refused) and storage.recounts == 1
    # Once the period passes, a count sees the expired records gone and makes room.
    time.sleep(0.6)
    now[0] += RECOUNT_EVERY_S
    assert storage.store_subkey(DHTID.generate(source="new"), "s", b"v", later)
    assert storage.recounts == 2
