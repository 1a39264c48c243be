"""The peer identity: one RSA key that is both the libp2p peer id and the record signer.

The key lives in the OS keyring (service "volunteer", one entry per `--home`, so several
daemons on one machine keep apart). Where no real keyring exists (servers, containers)
it falls back to `data_dir/identity.key` with mode 0600 and says so. Once created, the
key is reused, so the peer id stays the same across restarts. Errors::

    VolunteerError
    └── IdentityError   the stored key cannot be read (we never silently replace it)
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import logging
import os
import stat
from pathlib import Path

import keyring
import keyring.backend
import keyring.backends.fail
import keyring.errors
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from volunteer.errors import VolunteerError
from volunteer.machine.atomic import write_file_atomic
from volunteer.paths import Paths
from volunteer.swarm.dht_records import encode_p2p_identity

logger = logging.getLogger(__name__)

KEYRING_SERVICE = "volunteer"
FALLBACK_FILE_NAME = "identity.key"
RUNTIME_FILE_NAME = "p2p-identity.key"
MIN_KEY_BITS = 2048
_PRIVATE_MODE = 0o600


class IdentityError(VolunteerError):
    """The stored identity key is unreadable; fix or remove it (the peer id will change)."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """This peer's key and where it is kept.

    Attributes:
        private_key: the RSA key (libp2p identity and DHT record signer).
        stored_in: "keyring", or the path of the fallback file.
        warning: set when the key is not in a keyring, for the daemon to show the person.
    """

    private_key: RSAPrivateKey = dataclasses.field(repr=False)
    stored_in: str
    warning: str | None = None

    @property
    def peer_id(self) -> str:
        """The base58 libp2p peer id of this key."""
        return PeerID.from_identity(self.p2p_identity_bytes()).to_base58()

    def p2p_identity_bytes(self) -> bytes:
        """The key in the libp2p private key format that hivemind's `identity_path` reads."""
        return encode_p2p_identity(self.private_key)


def keyring_username(paths: Paths, kind: str = "peer-identity") -> str:
    """The keyring entry of one volunteer instance's secret `kind`, derived from its data
    folder (the API token's is "api-token")."""
    digest = hashlib.sha256(str(paths.data_dir).encode()).hexdigest()
    return f"{kind}-{digest[:16]}"


def fallback_path(paths: Paths) -> Path:
    """The 0600 file that holds the key where no keyring exists."""
    return paths.data_dir / FALLBACK_FILE_NAME


def runtime_identity_path(paths: Paths) -> Path:
    """Where the daemon writes the key file its DHT service hands to hivemind at start.

    hivemind's p2pd reads its key only from a file. The file lives in the 0700 runtime
    folder, mode 0600, and only while p2pd starts: the DHT service removes it once p2pd
    runs, and the daemon on every exit; a daemon killed while starting leaves it until
    the next start on this home overwrites and removes it.
    """
    return paths.runtime_dir / RUNTIME_FILE_NAME


def system_keyring() -> keyring.backend.KeyringBackend | None:
    """The OS keyring, or None where only a fail or a not-recommended backend exists.

    keyring marks backends with priority < 1 as not recommended: they are plaintext files
    (keyrings.alt) or stubs, no safer than our own 0600 file.
    """
    backend = keyring.get_keyring()
    if isinstance(backend, keyring.backends.fail.Keyring) or backend.priority < 1:
        return None
    return backend


def load_or_create_identity(
    paths: Paths, *, keyring_backend: keyring.backend.KeyringBackend | None = None
) -> Identity:
    """Loads this instance's identity key, creating and storing one on first use.

    Args:
        paths: the instance's folders (the data folder names the keyring entry and holds
            the fallback file).
        keyring_backend: where to keep the key; None uses `system_keyring()`. A fail
            backend, or one that errors, means the fallback file.

    Raises:
        IdentityError: a stored key exists but cannot be read.
    """
    backend = keyring_backend if keyring_backend is not None else system_keyring()
    if isinstance(backend, keyring.backends.fail.Keyring):
        backend = None
    username = keyring_username(paths)
    problem = "no OS keyring is available"
    if backend is not None:
        try:
            stored = backend.get_password(KEYRING_SERVICE, username)
        except keyring.errors.KeyringError as exc:
            backend, problem = None, f"the OS keyring failed ({exc})"
        else:
            if stored is not None:
                return Identity(_decode_keyring_value(stored), stored_in="keyring")
    path = fallback_path(paths)
    if path.exists():
        return _file_identity(_read_key_file(path), path, problem)
    key = RSAPrivateKey()
    if backend is not None:
        try:
            backend.set_password(KEYRING_SERVICE, username, _encode_keyring_value(key))
            logger.info("created a new peer identity in the OS keyring")
            return Identity(key, stored_in="keyring")
        except keyring.errors.KeyringError as exc:
            problem = f"the OS keyring refused the key ({exc})"
    write_private_file(path, encode_p2p_identity(key))
    logger.info("created a new peer identity in %s", path)
    return _file_identity(key, path, problem)


def write_private_file(path: Path, data: bytes) -> Path:
    """Writes `data` to `path` atomically, readable by this user only (mode 0600)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # write_file_atomic's temporary file is created 0600 (mkstemp), so no window is open.
    write_file_atomic(path, data)
    os.chmod(path, _PRIVATE_MODE)
    return path


def _file_identity(key: RSAPrivateKey, path: Path, problem: str) -> Identity:
    warning = (
        f"{problem}; the peer identity key is kept in {path} (mode 0600) instead. "
        f"Anyone who can read that file can act as this peer."
    )
    logger.warning("%s", warning)
    return Identity(key, stored_in=str(path), warning=warning)


def _encode_keyring_value(key: RSAPrivateKey) -> str:
    # Keyrings store text: the libp2p key bytes, base64-encoded.
    return base64.b64encode(encode_p2p_identity(key)).decode("ascii")


def _decode_keyring_value(value: str) -> RSAPrivateKey:
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise IdentityError(f"the peer identity in the OS keyring is not base64 ({exc})") from None
    return _decode_key(data, where="the OS keyring")


def _read_key_file(path: Path) -> RSAPrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        logger.warning("%s was readable by others (mode %o); setting it to 0600", path, mode)
        os.chmod(path, _PRIVATE_MODE)
    return _decode_key(path.read_bytes(), where=str(path))


def _decode_key(data: bytes, *, where: str) -> RSAPrivateKey:
    """Parses the libp2p private key format; only RSA keys of at least 2048 bits."""
    try:
        message = crypto_pb2.PrivateKey.FromString(data)
    except DecodeError as exc:
        raise IdentityError(f"the peer identity in {where} is corrupt ({exc})") from None
    if message.key_type != crypto_pb2.KeyType.RSA:
        raise IdentityError(f"the peer identity in {where} is not an RSA key")
    try:
        inner = serialization.load_der_private_key(message.data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"the peer identity in {where} is corrupt ({exc})") from None
    if not isinstance(inner, rsa.RSAPrivateKey) or inner.key_size < MIN_KEY_BITS:
        raise IdentityError(f"the peer identity in {where} is not an RSA key of >= 2048 bits")
    # hivemind rebuilds a key from DER only in __setstate__ (its pickle support); its
    # constructor would generate a fresh key instead.
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": message.data})
    return key
