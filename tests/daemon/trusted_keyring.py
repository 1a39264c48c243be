"""A keyring backend the daemon accepts, for tests: keyrings.alt's plaintext file at priority 1.

keyring ranks keyrings.alt below 1 ("not recommended") and `volunteer.daemon.identity`
refuses such backends, so without this every daemon in the suite keeps its key in the
fallback file. This subclass claims priority 1 and keeps its entries in the file named
by `TRUSTED_KEYRING_FILE`, so a test drives the keyring path for real. A daemon
subprocess selects it through keyring's own setting:
`PYTHON_KEYRING_BACKEND=tests.daemon.trusted_keyring.TrustedFileKeyring`.
"""

from __future__ import annotations

import os

from keyrings.alt.file import PlaintextKeyring

FILE_ENV = "TRUSTED_KEYRING_FILE"
BACKEND_NAME = f"{__name__}.TrustedFileKeyring"


class TrustedFileKeyring(PlaintextKeyring):
    """keyrings.alt's plaintext file backend, ranked as a real OS keyring."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.file_path = os.environ[FILE_ENV]
