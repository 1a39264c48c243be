"""The peer identity key: kept in a real keyring backend, or a 0600 file without one."""

from __future__ import annotations

import logging
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backends.fail
import pytest
from keyrings.alt.file import PlaintextKeyring

with warnings.catch_warnings():
    # hivemind's package import runs torch.jit.script, which torch deprecates; the suite
    # turns warnings into errors, so the import that triggers it is done here.
    warnings.simplefilter("ignore", DeprecationWarning)
    import hivemind  # noqa: F401


from tests.daemon.homes import ROOT, Homes
from tests.daemon.trusted_keyring import BACKEND_NAME, FILE_ENV, TrustedFileKeyring
from volunteer.daemon.identity import (
    KEYRING_SERVICE,
    IdentityError,
    fallback_path,
    keyring_username,
    load_or_create_identity,
    runtime_identity_path,
    system_keyring,
    write_private_file,
)
from volunteer.paths import Paths

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def make_paths(root: Path) -> Paths:
    return Paths.resolve(home=root, env={"VOLUNTEER_CACHE_DIR": str(root / "cache")})


def file_keyring(path: Path) -> PlaintextKeyring:
    backend = PlaintextKeyring()
    backend.file_path = str(path)
    return backend


def test_keyring_round_trip_keeps_the_peer_id(tmp_path: Path) -> None:
    paths = make_paths(tmp_path / "home")
    first = load_or_create_identity(paths, keyring_backend=file_keyring(tmp_path / "kr.cfg"))
    assert first.stored_in == "keyring"
    assert first.warning is None
    assert not fallback_path(paths).exists()
    backend = file_keyring(tmp_path / "kr.cfg")
    assert backend.get_password(KEYRING_SERVICE, keyring_username(paths))
    # A new backend object on the same file stands for a restarted daemon.
    again = load_or_create_identity(paths, keyring_backend=file_keyring(tmp_path / "kr.cfg"))
    assert again.peer_id == first.peer_id
    assert again.p2p_identity_bytes() == first.p2p_identity_bytes()
    assert first.peer_id.startswith("Qm")


def test_two_homes_get_two_identities(tmp_path: Path) -> None:
    backend = file_keyring(tmp_path / "kr.cfg")
    one = load_or_create_identity(make_paths(tmp_path / "one"), keyring_backend=backend)
    two = load_or_create_identity(make_paths(tmp_path / "two"), keyring_backend=backend)
    assert one.peer_id != two.peer_id
    fail = keyring.backends.fail.Keyring()
    three = load_or_create_identity(make_paths(tmp_path / "three"), keyring_backend=fail)
    four = load_or_create_identity(make_paths(tmp_path / "four"), keyring_backend=fail)
    assert len({one.peer_id, two.peer_id, three.peer_id, four.peer_id}) == 4


@posix_only
def test_without_a_keyring_falls_back_to_a_private_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = make_paths(tmp_path / "home")
    fail = keyring.backends.fail.Keyring()
    with caplog.at_level(logging.WARNING, logger="volunteer.daemon.identity"):
        first = load_or_create_identity(paths, keyring_backend=fail)
    path = fallback_path(paths)
    assert first.stored_in == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.warning is not None
    assert "no OS keyring" in first.warning
    assert str(path) in first.warning
    assert first.warning in caplog.text
    again = load_or_create_identity(paths, keyring_backend=fail)
    assert again.peer_id == first.peer_id
    assert again.warning is not None


def test_a_file_identity_is_kept_when_a_keyring_appears(tmp_path: Path) -> None:
    # Moving to a keyring must not change the peer id the swarm knows us by.
    paths = make_paths(tmp_path / "home")
    old = load_or_create_identity(paths, keyring_backend=keyring.backends.fail.Keyring())
    new = load_or_create_identity(paths, keyring_backend=file_keyring(tmp_path / "kr.cfg"))
    assert new.peer_id == old.peer_id
    assert new.stored_in == str(fallback_path(paths))


@posix_only
def test_a_loose_file_mode_is_tightened(tmp_path: Path) -> None:
    paths = make_paths(tmp_path / "home")
    fail = keyring.backends.fail.Keyring()
    first = load_or_create_identity(paths, keyring_backend=fail)
    os.chmod(fallback_path(paths), 0o644)
    again = load_or_create_identity(paths, keyring_backend=fail)
    assert again.peer_id == first.peer_id
    assert stat.S_IMODE(fallback_path(paths).stat().st_mode) == 0o600


def test_a_corrupt_keyring_entry_is_an_error_not_a_new_identity(tmp_path: Path) -> None:
    paths = make_paths(tmp_path / "home")
    backend = file_keyring(tmp_path / "kr.cfg")
    for junk in ("not base64 !!", "aGVsbG8gd29ybGQ="):
        backend.set_password(KEYRING_SERVICE, keyring_username(paths), junk)
        with pytest.raises(IdentityError, match="OS keyring"):
            load_or_create_identity(paths, keyring_backend=backend)


def test_a_corrupt_file_is_an_error(tmp_path: Path) -> None:
    paths = make_paths(tmp_path / "home")
    write_private_file(fallback_path(paths), b"\x08\x00\x12\x04junk")
    with pytest.raises(IdentityError, match=r"identity\.key"):
        load_or_create_identity(paths, keyring_backend=keyring.backends.fail.Keyring())


@posix_only
def test_write_private_file(tmp_path: Path) -> None:
    path = write_private_file(tmp_path / "sub" / "key", b"secret")
    assert path.read_bytes() == b"secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.fixture
def os_keyring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """keyring's process-wide backend set to one the daemon accepts; its file's path."""
    path = tmp_path / "os-keyring.cfg"
    monkeypatch.setenv(FILE_ENV, str(path))
    previous = keyring.get_keyring()
    keyring.set_keyring(TrustedFileKeyring())
    try:
        yield path
    finally:
        keyring.set_keyring(previous)


def test_a_recommended_system_keyring_holds_the_key(tmp_path: Path, os_keyring: Path) -> None:
    # No backend passed: the daemon's own choice, `system_keyring()`, must pick this one.
    paths = make_paths(tmp_path / "home")
    first = load_or_create_identity(paths)
    assert (first.stored_in, first.warning) == ("keyring", None)
    assert not fallback_path(paths).exists()
    assert TrustedFileKeyring().get_password(KEYRING_SERVICE, keyring_username(paths))
    keyring.set_keyring(TrustedFileKeyring())  # a fresh backend object: a restart
    again = load_or_create_identity(paths)
    assert (again.stored_in, again.peer_id) == ("keyring", first.peer_id)


def test_a_not_recommended_system_keyring_is_refused(tmp_path: Path, os_keyring: Path) -> None:
    keyring.set_keyring(file_keyring(os_keyring))  # keyrings.alt at its own priority, 0.5
    assert system_keyring() is None
    paths = make_paths(tmp_path / "home")
    identity = load_or_create_identity(paths)
    assert identity.stored_in == str(fallback_path(paths))
    assert not os_keyring.exists()


def test_a_daemon_keeps_its_identity_in_the_keyring_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keyring_file = tmp_path / "os-keyring.cfg"
    monkeypatch.setenv(FILE_ENV, str(keyring_file))  # for the reads below, in this process
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    homes = Homes(
        tmp_path / "homes",
        VOLUNTEER_NUM_BLOCKS="0",
        PYTHON_KEYRING_BACKEND=BACKEND_NAME,
        TRUSTED_KEYRING_FILE=str(keyring_file),
        PYTHONPATH=python_path,
    )
    home = homes.home("keyring")
    paths = Paths.resolve(home=home, env=homes.env)
    try:
        started = homes.cli(home, "start")
        assert started.returncode == 0, started.stderr
        first = homes.status(home)["peer_id"]
        stored = TrustedFileKeyring().get_password(KEYRING_SERVICE, keyring_username(paths))
        assert stored and not fallback_path(paths).exists()
        # hivemind's p2pd read its key from a file: gone once it runs.
        assert not runtime_identity_path(paths).exists()
        in_keyring = load_or_create_identity(paths, keyring_backend=TrustedFileKeyring())
        assert (in_keyring.stored_in, in_keyring.peer_id) == ("keyring", first)
        assert homes.cli(home, "stop").returncode == 0
        assert homes.cli(home, "start").returncode == 0
        assert homes.status(home)["peer_id"] == first
        assert not fallback_path(paths).exists()
    finally:
        homes.cli(home, "stop")
        homes.reap()
    assert not runtime_identity_path(paths).exists()
