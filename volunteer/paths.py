"""Where volunteer keeps its files.

Config, data, identity and logs live under platformdirs' per-user folders, or all under
one `home` folder when the user gives `--home DIR` / `VOLUNTEER_HOME` (tests and several
daemons on one machine). The model cache is shared by every daemon of the user
(`VOLUNTEER_CACHE_DIR` overrides it) because models are large and written atomically.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import platformdirs

APP_NAME = "volunteer"


@dataclasses.dataclass(frozen=True)
class Paths:
    """The folders one volunteer instance uses."""

    config_dir: Path
    data_dir: Path
    log_dir: Path
    runtime_dir: Path
    cache_dir: Path
    """Shared model cache (not under `home`: every daemon of the user reuses it)."""

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def daemon_log(self) -> Path:
        """The daemon's log (rotated beside itself), tailed by the TUI's log panel."""
        return self.log_dir / "daemon.log"

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"

    @classmethod
    def resolve(cls, *, home: str | Path | None, env: Mapping[str, str]) -> Paths:
        """Chooses the folders from `--home` (or `VOLUNTEER_HOME`) and the environment.

        Args:
            home: the `--home` flag, if given; it wins over `VOLUNTEER_HOME`.
            env: the process environment (passed in so callers and tests control it).
        """
        cache = env.get("VOLUNTEER_CACHE_DIR") or platformdirs.user_cache_dir(APP_NAME)
        home = home or env.get("VOLUNTEER_HOME")
        if home:
            root = Path(home).expanduser().resolve()
            return cls(
                config_dir=root,
                data_dir=root / "data",
                log_dir=root / "logs",
                runtime_dir=root / "run",
                cache_dir=Path(cache).expanduser(),
            )
        data_dir = Path(platformdirs.user_data_dir(APP_NAME))
        # Without XDG_RUNTIME_DIR (servers, containers) platformdirs guesses a /tmp path and
        # warns; our data dir is private to the user and always exists, so use it instead.
        has_runtime = os.name != "posix" or bool(env.get("XDG_RUNTIME_DIR"))
        return cls(
            config_dir=Path(platformdirs.user_config_dir(APP_NAME)),
            data_dir=data_dir,
            log_dir=Path(platformdirs.user_log_dir(APP_NAME)),
            runtime_dir=(
                Path(platformdirs.user_runtime_dir(APP_NAME)) if has_runtime else data_dir / "run"
            ),
            cache_dir=Path(cache).expanduser(),
        )

    @classmethod
    def from_environ(cls, home: str | Path | None = None) -> Paths:
        """`resolve` against `os.environ`; for the CLI edge only."""
        return cls.resolve(home=home, env=os.environ)
