"""The known-peers file: what a daemon keeps of the peers it met, read back defensively."""

from __future__ import annotations

import json
from pathlib import Path

from volunteer.daemon import known_peers

PEER = "QmThwcFCreooVw3AyVPwUkKpXaJRCGSak9i9XTf8UTyYDq"
ADDRESS = f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"


def test_saved_addresses_read_back_in_order_without_repeats(tmp_path: Path) -> None:
    path = tmp_path / "known_peers.json"
    other = f"/ip4/127.0.0.1/tcp/4002/p2p/{PEER}"
    known_peers.save(path, [ADDRESS, other, ADDRESS])
    assert known_peers.load(path) == [ADDRESS, other]


def test_a_missing_or_broken_file_is_no_peers(tmp_path: Path) -> None:
    path = tmp_path / "known_peers.json"
    assert known_peers.load(path) == []
    for text in ("{not json", '{"a": 1}', "null"):
        path.write_text(text)
        assert known_peers.load(path) == []


def test_entries_that_are_not_p2p_addresses_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "known_peers.json"
    entries = [ADDRESS, 7, None, "/ip4/127.0.0.1/tcp/1", "not an address", "/p2p/x"]
    path.write_text(json.dumps(entries))
    assert known_peers.load(path) == [ADDRESS]


def test_the_list_and_the_file_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "known_peers.json"
    many = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{PEER}" for port in range(1000, 3000)]
    known_peers.save(path, many)
    limit = known_peers.MAX_KNOWN_PEERS * known_peers.MAX_ADDRS_PER_PEER
    assert known_peers.load(path) == many[:limit]
    path.write_text(json.dumps([ADDRESS]) + " " * known_peers.MAX_FILE_BYTES)
    assert known_peers.load(path) == []
