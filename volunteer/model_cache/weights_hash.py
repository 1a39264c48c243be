"""One hash for the weights a peer serves, so that peers can tell the same model apart from
another one published under the same name.

Servers announce it in their records (`ServerInfo.weights_sha256`); a client routes only
through servers whose hash equals that of the files it runs the model's ends from, and a
daemon counts only such servers when it chooses its blocks. The hash covers the
safetensors files of the folder (the weights `volunteer.models.checkpoint` loads), each
by name and content, in name order.

Hashing gigabytes takes a while, so the result is kept beside the files in
`CACHE_NAME`, keyed by each file's name, size and modification time, and reused until
one of them changes. A folder that cannot be written (read-only) is hashed again each
time, which is slow but still right.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from volunteer.errors import ModelStoreError, VolunteerError
from volunteer.machine.atomic import write_file_atomic
from volunteer.model_cache.pypi_wheel import sha256_file
from volunteer.swarm.records import WEIGHTS_SHA256_RE

logger = logging.getLogger(__name__)

CACHE_NAME = ".volunteer-weights-sha256.json"
FORMAT = "volunteer-weights-sha256/1"
"""Names the recipe; a new recipe changes it, so old caches and hashes never match new."""

_Stamp = list[list[str | int]]
"""[[name, size, mtime_ns], ...] of the weight files, in name order."""


def weights_hash(folder: Path) -> str:
    """The hex sha256 of the model's weights in `folder` (see the module docstring).
    Blocks: run it off the event loop.

    Raises:
        ModelStoreError: the folder holds no safetensors weights, or they cannot be read.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelStoreError(f"{folder} holds no *.safetensors weights to hash")
    try:
        stamp = _stamp(files)
        cached = _read_cache(folder / CACHE_NAME, stamp)
        if cached is not None:
            return cached
        digest = _hash(files)
        unchanged = _stamp(files) == stamp  # a file rewritten meanwhile: do not cache
    except OSError as exc:
        raise ModelStoreError(f"cannot read the weights in {folder}: {exc}") from exc
    if unchanged:
        _write_cache(folder / CACHE_NAME, stamp, digest)
    return digest


def _stamp(files: list[Path]) -> _Stamp:
    stamp: _Stamp = []
    for path in files:
        stat = path.stat()
        stamp.append([path.name, stat.st_size, stat.st_mtime_ns])
    return stamp


def _hash(files: list[Path]) -> str:
    # A manifest of (name, file hash) lines, hashed: the same files give the same hash
    # on every peer, and a renamed, added or dropped shard gives another.
    listing = [FORMAT] + [f"{path.name}\t{sha256_file(path)}" for path in files]
    return hashlib.sha256("\n".join(listing).encode("utf-8")).hexdigest()


def _read_cache(path: Path, stamp: _Stamp) -> str | None:
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: hash again
        return None
    if not isinstance(cached, dict) or cached.get("format") != FORMAT:
        return None
    digest = cached.get("sha256")
    if cached.get("files") != stamp or not isinstance(digest, str):
        return None
    if not re.fullmatch(WEIGHTS_SHA256_RE, digest):
        return None
    return digest


def _write_cache(path: Path, stamp: _Stamp, digest: str) -> None:
    data = json.dumps({"format": FORMAT, "files": stamp, "sha256": digest}, indent=1)
    try:
        write_file_atomic(path, data.encode("utf-8"))
    except (OSError, VolunteerError) as exc:
        logger.info("could not keep the weights' hash beside them (%s); it is recomputed", exc)
