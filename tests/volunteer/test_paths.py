"""Where files go: --home / VOLUNTEER_HOME isolate an instance; the model cache is shared."""

from __future__ import annotations

from pathlib import Path

from volunteer.paths import Paths


def test_home_holds_config_data_logs_and_runtime(tmp_path: Path) -> None:
    paths = Paths.resolve(home=tmp_path / "a", env={})
    for folder in (paths.config_dir, paths.data_dir, paths.log_dir, paths.runtime_dir):
        assert folder.is_relative_to(tmp_path / "a")
    assert paths.config_file == tmp_path / "a" / "config.toml"
    assert not paths.cache_dir.is_relative_to(tmp_path / "a")


def test_env_home_applies_and_the_flag_wins(tmp_path: Path) -> None:
    env = {"VOLUNTEER_HOME": str(tmp_path / "env")}
    assert Paths.resolve(home=None, env=env).data_dir.is_relative_to(tmp_path / "env")
    assert Paths.resolve(home=tmp_path / "flag", env=env).data_dir.is_relative_to(tmp_path / "flag")


def test_two_homes_share_one_model_cache(tmp_path: Path) -> None:
    env = {"VOLUNTEER_CACHE_DIR": str(tmp_path / "cache")}
    first = Paths.resolve(home=tmp_path / "a", env=env)
    second = Paths.resolve(home=tmp_path / "b", env=env)
    assert first.models_dir == second.models_dir == tmp_path / "cache" / "models"
    assert first.data_dir != second.data_dir


def test_without_home_uses_per_user_folders() -> None:
    paths = Paths.resolve(home=None, env={})
    assert "volunteer" in str(paths.config_dir) and "volunteer" in str(paths.cache_dir)
    assert paths.runtime_dir == paths.data_dir / "run"  # no XDG_RUNTIME_DIR given
