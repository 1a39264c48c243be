"""ServerInfo validation and the SwarmSnapshot helpers (pure data, no network)."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import msgpack
import pytest
from volunteer.scheduler.block_selection import CLAIM_CAP_FACTOR

from volunteer.swarm.records import (
    RecordError,
    ServerInfo,
    ServerState,
    SwarmSnapshot,
    block_key,
)

OURS, THEIRS = "a" * 64, "b" * 64
"""Weights hashes of two different models published under one name."""


def make_info(**changes: Any) -> ServerInfo:
    fields: dict[str, Any] = {
        "state": ServerState.ONLINE,
        "start": 2,
        "end": 5,
        "throughput": 12.5,
        "dtype": "bfloat16",
        "cache_tokens_left": 4096,
        "version": "0.1.0",
        "public_name": "alice's laptop",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    fields.update(changes)
    return ServerInfo(**fields)


def test_wire_round_trip_through_msgpack() -> None:
    info = make_info(
        inference_rps=3.0,
        forward_rps=1.5,
        local_socket="/tmp/volunteer-links-x1/blocks.sock",
        boot_id="2f1c8a5e-0d1b-4b7e-9d1e-5c6f7a8b9c0d",
        weights_sha256=OURS,
        device_class="cpu",
    )
    wire = msgpack.unpackb(msgpack.packb(info.to_wire()))
    assert ServerInfo.from_wire(wire) == info
    assert wire["state"] == "online"


def test_unknown_fields_are_ignored() -> None:
    wire = make_info().to_wire() | {"schema_version": 7, "gpu": "H100", "extra": [1, 2]}
    parsed = ServerInfo.from_wire(wire)
    assert parsed.schema_version == 7
    assert parsed == make_info(schema_version=7)


def test_optional_fields_may_be_missing() -> None:
    wire = make_info().to_wire()
    for name in (
        "inference_rps",
        "forward_rps",
        "public_name",
        "schema_version",
        "local_socket",
        "boot_id",
        "weights_sha256",
        "device_class",
    ):
        del wire[name]
    parsed = ServerInfo.from_wire(wire)
    assert parsed.public_name is None and parsed.local_socket is None
    # A record from before weights were hashed: unknown, not an error.
    assert parsed.weights_sha256 is None and parsed.device_class is None
    assert parsed.schema_version == 1


BAD_FIELDS = [
    {"start": -1},
    {"start": 5},
    {"start": 6, "end": 5},
    {"end": 10**9},
    {"start": "1"},
    {"start": True},
    {"start": 1.0},
    {"throughput": -0.1},
    {"throughput": math.inf},
    {"throughput": math.nan},
    {"throughput": "fast"},
    {"cache_tokens_left": -1},
    {"state": "busy"},
    {"dtype": "x" * 1000},
    {"dtype": ""},
    {"version": "1.0; rm -rf /"},
    {"public_name": "n" * 65},
    {"public_name": "\x1b[2Jhello"},
    {"model": "bad model"},
    {"model": "m" * 500},
    {"inference_rps": -5.0},
    {"local_socket": "/" + "s" * 200},
    {"local_socket": 5},
    {"boot_id": "a boot; with spaces"},
    {"weights_sha256": "ab" * 31},
    {"weights_sha256": "AB" * 32},
    {"weights_sha256": "g" * 64},
    {"weights_sha256": 5},
    {"device_class": "cpu; lies"},
]


@pytest.mark.parametrize("bad", BAD_FIELDS, ids=repr)
def test_malformed_fields_are_rejected(bad: dict[str, Any]) -> None:
    wire = make_info().to_wire() | bad
    with pytest.raises(RecordError, match="bad server record"):
        ServerInfo.from_wire(wire)


@pytest.mark.parametrize(
    "value", [b"\x93\x00garbage", "online", None, 42, [1, 2, 3], {}, {"state": "online"}]
)
def test_non_records_are_rejected(value: object) -> None:
    with pytest.raises(RecordError):
        ServerInfo.from_wire(value)


def test_error_message_stays_short_for_huge_input() -> None:
    with pytest.raises(RecordError) as caught:
        ServerInfo.from_wire(make_info().to_wire() | {"dtype": "z" * 100_000})
    assert len(str(caught.value)) < 200


def test_records_are_frozen() -> None:
    info = make_info()
    with pytest.raises(ValueError):
        info.start = 0  # type: ignore[misc]


def test_block_key() -> None:
    assert block_key("org/model-1.5B", 7) == "org/model-1.5B.block7"
    for model in ("", "has space", "ctrl\n", "-leading-dash", "m" * 200):
        with pytest.raises(RecordError):
            block_key(model, 0)
    for index in (-1, 10**6, True):
        with pytest.raises(RecordError):
            block_key("m", index)


def snapshot(
    num_blocks: int, spans: dict[str, tuple[int, int, float, ServerState]]
) -> SwarmSnapshot:
    entries = []
    for peer, (start, end, throughput, state) in spans.items():
        info = make_info(start=start, end=end, throughput=throughput, state=state, model="m")
        entries += [(index, peer, info) for index in range(start, end)]
    return SwarmSnapshot.build("m", num_blocks, entries)


def test_snapshot_helpers() -> None:
    snap = snapshot(
        6,
        {
            "peerB": (0, 3, 2.0, ServerState.ONLINE),
            "peerA": (2, 5, 1.0, ServerState.JOINING),
            "peerC": (1, 6, 100.0, ServerState.OFFLINE),
        },
    )
    assert list(snap.servers_for_block(2)) == ["peerA", "peerB", "peerC"]
    assert list(snap.servers_for_block(5)) == ["peerC"]
    assert list(snap.spans()) == ["peerA", "peerB", "peerC"]
    assert (snap.spans()["peerA"].start, snap.spans()["peerA"].end) == (2, 5)
    # Offline servers carry no traffic; joining ones carry none yet.
    assert snap.block_throughput() == [2.0, 2.0, 2.0, 0.0, 0.0, 0.0]
    with pytest.raises(IndexError):
        snap.servers_for_block(6)


def test_snapshot_rejects_out_of_range_entries() -> None:
    with pytest.raises(ValueError):
        SwarmSnapshot.build("m", 2, [(2, "p", make_info(start=0, end=3, model="m"))])


def test_weakest_span_finds_the_gap() -> None:
    snap = snapshot(
        8,
        {
            "a": (0, 4, 10.0, ServerState.ONLINE),
            "b": (6, 8, 10.0, ServerState.ONLINE),
        },
    )
    assert snap.weakest_span(2) == (4, 6)
    assert snap.weakest_span(3) == (3, 6)
    assert snap.weakest_span(1) == (4, 5)
    assert snap.weakest_span(8) == (0, 8)


def test_weakest_span_ties_go_to_the_lowest_start() -> None:
    assert snapshot(5, {}).weakest_span(2) == (0, 2)
    snap = snapshot(6, {"a": (0, 2, 1.0, ServerState.ONLINE)})
    assert snap.weakest_span(2) == (2, 4)
    snap = snapshot(6, {"a": (2, 4, 1.0, ServerState.ONLINE)})
    assert snap.weakest_span(3) == (0, 3)


def test_snapshot_does_not_depend_on_arrival_order() -> None:
    entries = []
    for peer, (start, end, throughput) in {
        "p1": (0, 3, 0.1),
        "p2": (1, 4, 0.2),
        "p3": (0, 4, 0.3),
        "p4": (2, 4, 1e-9),
    }.items():
        info = make_info(start=start, end=end, throughput=throughput, model="m")
        entries += [(index, peer, info) for index in range(start, end)]
    first = SwarmSnapshot.build("m", 4, entries)
    for seed in range(5):
        shuffled = list(entries)
        random.Random(seed).shuffle(shuffled)
        again = SwarmSnapshot.build("m", 4, shuffled)
        assert [list(block) for block in again.blocks] == [list(block) for block in first.blocks]
        assert again.block_throughput() == first.block_throughput()
        assert again.weakest_span(2) == first.weakest_span(2)


@pytest.mark.parametrize("num_blocks", [0, -1, 4])
def test_weakest_span_rejects_bad_sizes(num_blocks: int) -> None:
    with pytest.raises(ValueError):
        snapshot(3, {}).weakest_span(num_blocks)


def test_a_moved_server_counts_by_its_serving_record() -> None:
    # It left blocks 0:2 (OFFLINE records there until they expire) for 4:6.
    left = make_info(start=0, end=2, state=ServerState.OFFLINE, model="m")
    entries = [(i, "mover", left) for i in (0, 1)]
    entries += [(i, "mover", make_info(start=4, end=6, throughput=3.0, model="m")) for i in (4, 5)]
    snap = SwarmSnapshot.build("m", 6, entries)
    assert (snap.spans()["mover"].start, snap.spans()["mover"].end) == (4, 6)
    assert [(s.peer_id, s.start, s.end) for s in snap.server_spans()] == [("mover", 4, 6)]


def test_a_server_moving_is_described_by_its_online_record() -> None:
    # Loading 0:2 (JOINING there) while still serving 4:6: it is the server of 4:6 until
    # the move is done, whichever block comes first.
    joining = make_info(start=0, end=2, state=ServerState.JOINING, model="m")
    entries = [(i, "mover", joining) for i in (0, 1)]
    entries += [(i, "mover", make_info(start=4, end=6, model="m")) for i in (4, 5)]
    snap = SwarmSnapshot.build("m", 6, entries)
    assert snap.spans()["mover"].state is ServerState.ONLINE
    assert (snap.spans()["mover"].start, snap.spans()["mover"].end) == (4, 6)
    leaving = make_info(start=4, end=6, state=ServerState.LEAVING, model="m")
    entries = [(i, "leaver", leaving) for i in (4, 5)] + [(0, "leaver", joining)]
    assert SwarmSnapshot.build("m", 6, entries).spans()["leaver"].state is ServerState.LEAVING


def test_without_drops_one_peers_records() -> None:
    snap = snapshot(4, {"a": (0, 2, 1.0, ServerState.ONLINE), "b": (1, 4, 2.0, ServerState.ONLINE)})
    alone = snap.without("b")
    assert alone.block_throughput() == [1.0, 1.0, 0.0, 0.0]
    assert snap.block_throughput() == [1.0, 3.0, 2.0, 2.0]  # the original is untouched
    assert [s.peer_id for s in alone.server_spans()] == ["a"]


def test_a_snapshot_round_trips_through_json() -> None:
    snap = snapshot(
        6, {"a": (0, 3, 2.0, ServerState.ONLINE), "b": (2, 6, 1.5, ServerState.OFFLINE)}
    )
    data = snap.to_json()
    assert data["block_throughput"] == [2.0, 2.0, 2.0, 0.0, 0.0, 0.0]
    assert [s["peer_id"] for s in data["servers"]] == ["a", "b"]
    again = SwarmSnapshot.from_json(json.loads(json.dumps(data)))
    assert again == snap


@pytest.mark.parametrize(
    "data",
    [
        None,
        {"model": "m", "num_blocks": 2},
        {"model": "m", "num_blocks": 2, "servers": [{"start": 0}]},
        {"model": "m", "num_blocks": 2, "servers": [{"peer_id": "a", "start": "x"}]},
        {"model": "m", "num_blocks": 1, "servers": [{"peer_id": "a", **make_info().to_wire()}]},
    ],
)
def test_malformed_swarm_json_is_refused(data: object) -> None:
    with pytest.raises(RecordError):
        SwarmSnapshot.from_json(data)


def test_joining_records_do_not_count_as_capacity() -> None:
    # A JOINING record is no route for any client: counting it let fake ones steer
    # newcomers away from the blocks they claimed.
    honest = {"a": (0, 2, 100.0, ServerState.ONLINE)}
    fake = {f"fake{i}": (2, 4, 1e9, ServerState.JOINING) for i in range(3)}
    snap = snapshot(4, {**honest, **fake})
    assert snap.block_throughput() == [100.0, 100.0, 0.0, 0.0]
    assert snap.weakest_span(2) == (2, 4)
    assert [span.peer_id for span in snap.server_spans()] == ["a"]


def test_one_inflated_claim_counts_as_a_few_typical_servers() -> None:
    # Six honest servers on 0:2 outweigh one honest server and one liar on 2:4 once the
    # liar's 1e9 counts as CLAIM_CAP_FACTOR typical servers; uncapped, the liar would
    # draw the newcomer to 0:2.
    spans = {f"h{i}": (0, 2, 100.0, ServerState.ONLINE) for i in range(6)}
    spans["h6"] = (2, 4, 100.0, ServerState.ONLINE)
    spans["liar"] = (2, 4, 1e9, ServerState.ONLINE)
    snap = snapshot(4, spans)
    assert snap.claim_cap() == CLAIM_CAP_FACTOR * 100.0
    liar_side = 100.0 + CLAIM_CAP_FACTOR * 100.0
    assert liar_side < 600.0
    assert snap.block_throughput() == [600.0, 600.0, liar_side, liar_side]
    assert snap.weakest_span(2) == (2, 4)
    assert {s.peer_id: s.throughput for s in snap.server_spans()}[
        "liar"
    ] == CLAIM_CAP_FACTOR * 100.0


def test_placement_counts_only_servers_of_the_same_weights() -> None:
    # Under one model name: ours on 0:2, a far faster server of other weights on 2:4, and
    # an older peer that states no hash on 2:4. Neither of those can share a route with
    # ours, so for placement 2:4 is unserved and is where a newcomer of ours goes.
    entries = []
    for peer, start, end, throughput, weights in (
        ("ours", 0, 2, 100.0, OURS),
        ("theirs", 2, 4, 1e6, THEIRS),
        ("unstated", 2, 4, 100.0, None),
    ):
        info = make_info(
            start=start, end=end, throughput=throughput, model="m", weights_sha256=weights
        )
        entries += [(index, peer, info) for index in range(start, end)]
    snap = SwarmSnapshot.build("m", 4, entries)
    assert snap.weakest_span(2) == (0, 2)  # all records counted: 0:2 looks weakest
    ours = snap.with_weights(OURS)
    assert list(ours.spans()) == ["ours"]
    assert ours.block_throughput() == [100.0, 100.0, 0.0, 0.0]
    assert ours.weakest_span(2) == (2, 4)
    assert [s.peer_id for s in ours.server_spans()] == ["ours"]
    assert list(snap.with_weights(THEIRS).spans()) == ["theirs"]
    # The same weights held in another form count neither (a placement of q4 servers
    # looks at q4 servers).
    form = next(iter(snap.spans().values())).dtype
    assert list(snap.with_weights(OURS, form).spans()) == ["ours"]
    assert list(snap.with_weights(OURS, "q4g64").spans()) == []
