"""The API token: made once and kept in the keyring (keyrings.alt's file backend here) or,
without one, in a 0600 file; a damaged one is refused, never replaced; `volunteer
api-token` shows the one the daemon uses."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import keyring.backends.fail
import pytest

from tests.daemon.homes import Homes
from tests.daemon.test_identity import file_keyring, make_paths
from volunteer.daemon.api_token import ApiTokenError, load_or_create_api_token
from volunteer.daemon.identity import KEYRING_SERVICE, keyring_username


def test_the_token_is_made_once_and_kept_in_the_keyring(tmp_path: Path) -> None:
    paths = make_paths(tmp_path / "home")
    first = load_or_create_api_token(paths, keyring_backend=file_keyring(tmp_path / "kr.cfg"))
    assert first.stored_in == "keyring" and first.value.startswith("vol-")
    backend = file_keyring(tmp_path / "kr.cfg")
    assert (
        backend.get_password(KEYRING_SERVICE, keyring_username(paths, "api-token")) == first.value
    )
    again = load_or_create_api_token(paths, keyring_backend=file_keyring(tmp_path / "kr.cfg"))
    assert again.value == first.value
    other = load_or_create_api_token(make_paths(tmp_path / "other"), keyring_backend=backend)
    assert other.value != first.value


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_without_a_keyring_the_token_is_a_private_file(tmp_path: Path) -> None:
    paths = make_paths(tmp_path / "home")
    fail = keyring.backends.fail.Keyring()
    first = load_or_create_api_token(paths, keyring_backend=fail)
    path = Path(first.stored_in)
    assert path.read_text() == first.value
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    assert load_or_create_api_token(paths, keyring_backend=fail).value == first.value
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # made private again
    path.write_text("not a token")
    with pytest.raises(ApiTokenError, match="malformed"):
        load_or_create_api_token(paths, keyring_backend=fail)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ApiTokenError, match="cannot be read"):
        load_or_create_api_token(paths, keyring_backend=fail)


def test_the_command_shows_the_same_token_each_time(tmp_path: Path) -> None:
    homes = Homes(tmp_path, PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring")
    home = homes.home("one")
    shown = [homes.cli(home, "api-token") for _ in range(2)]
    assert all(result.returncode == 0 for result in shown), shown[0].stderr
    assert shown[0].stdout == shown[1].stdout and shown[0].stdout.startswith("vol-")
    assert "mode 0600" in shown[0].stderr  # no OS keyring: where it is kept is said
