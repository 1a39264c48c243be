"""The OpenAI API's bearer token: made at the first start that serves the API, kept where
the peer identity is (the OS keyring, one entry per `--home`; else `data_dir/api.token`,
mode 0600, said so), and shown by `volunteer api-token`."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import stat

import keyring.backend
import keyring.backends.fail
import keyring.errors

from volunteer.daemon.identity import (
    KEYRING_SERVICE,
    keyring_username,
    system_keyring,
    write_private_file,
)
from volunteer.errors import VolunteerError
from volunteer.paths import Paths

logger = logging.getLogger(__name__)

FILE_NAME = "api.token"
PREFIX = "vol-"
_TOKEN_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class ApiTokenError(VolunteerError):
    """The stored token cannot be read (it is never silently replaced: clients hold it)."""


@dataclasses.dataclass(frozen=True)
class ApiToken:
    value: str = dataclasses.field(repr=False)
    stored_in: str
    """"keyring", or the path of the 0600 file."""


def load_or_create_api_token(
    paths: Paths, *, keyring_backend: keyring.backend.KeyringBackend | None = None
) -> ApiToken:
    """This instance's API token, made and stored on first use (see the module doc).

    Raises:
        ApiTokenError: a stored token is malformed.
    """
    backend = keyring_backend if keyring_backend is not None else system_keyring()
    if isinstance(backend, keyring.backends.fail.Keyring):
        backend = None
    username = keyring_username(paths, "api-token")
    if backend is not None:
        try:
            stored = backend.get_password(KEYRING_SERVICE, username)
        except keyring.errors.KeyringError as exc:
            logger.warning("the OS keyring failed (%s): the API token is kept in a file", exc)
            backend = None
        else:
            if stored is not None:
                return ApiToken(_checked(stored, "the OS keyring"), "keyring")
    path = paths.data_dir / FILE_NAME
    if path.exists():
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)  # as the identity file: never readable by others
        try:
            text = path.read_text("ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiTokenError(f"the API token in {path} cannot be read ({exc})") from None
        return ApiToken(_checked(text, str(path)), str(path))
    token = PREFIX + secrets.token_urlsafe(32)
    if backend is not None:
        try:
            backend.set_password(KEYRING_SERVICE, username, token)
            return ApiToken(token, "keyring")
        except keyring.errors.KeyringError as exc:
            logger.warning("the OS keyring refused the API token (%s): kept in a file", exc)
    write_private_file(path, token.encode("ascii"))
    return ApiToken(token, str(path))


def _checked(token: str, where: str) -> str:
    if not token.startswith(PREFIX) or len(token) < 24 or not set(token) <= _TOKEN_CHARS:
        raise ApiTokenError(
            f"the API token in {where} is malformed; remove it and a new one is made "
            "(clients then need the new one)"
        )
    return token
