"""`volunteer chat --local` as a user runs it: a real process, a fresh cache, the real model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TIMEOUT_S = 600


def _chat(tmp_path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VOLUNTEER_HOME"}
    env["VOLUNTEER_CACHE_DIR"] = str(tmp_path / "cache")
    command = [sys.executable, "-m", "volunteer", "--home", str(tmp_path / "home"), "chat"]
    return subprocess.run(
        [*command, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_first_chat_fetches_the_default_then_chats_interactively(tmp_path: Path) -> None:
    question = "What is the capital of France?"
    first = _chat(tmp_path, "--local", "--temperature", "0", "--max-new-tokens", "40", question)
    assert first.returncode == 0, first.stderr
    assert "Paris" in first.stdout
    assert (tmp_path / "cache" / "models" / "smollm2-135m-instruct" / "config.json").exists()

    # Same cache, no download now; two turns, the second relying on the first.
    session = _chat(
        tmp_path,
        "--local",
        "--temperature",
        "0",
        "--max-new-tokens",
        "40",
        stdin=f"{question}\nAnd what is the capital of Germany?\n/exit\n",
    )
    assert session.returncode == 0, session.stderr
    assert "Paris" in session.stdout and "Berlin" in session.stdout
    assert "Downloading" not in session.stderr

    # 4-bit weights and a 4-bit attention cache still know it.
    args = ("--local", "--dtype", "q4", "--kv-cache", "q4", "--max-new-tokens", "24")
    small = _chat(tmp_path, *args, question)
    assert small.returncode == 0, small.stderr
    assert "Paris" in small.stdout


def test_a_4_bit_cache_is_for_local_chat_only(tmp_path: Path) -> None:
    """Servers keep float caches (a client's checks recompute their steps with one)."""
    result = _chat(tmp_path, "--kv-cache", "q4", "hi")
    assert result.returncode == 1
    assert "--kv-cache goes with --local" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_bad_sampling_options_get_one_clear_line(tmp_path: Path) -> None:
    result = _chat(tmp_path, "--local", "--top-p", "1.5", "hi")
    assert result.returncode == 1
    assert result.stderr.strip() == "volunteer: error: top_p must be in (0, 1], got 1.5"
    assert not (tmp_path / "cache").exists()
