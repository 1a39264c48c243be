"""Pulling Hugging Face repos through the real `huggingface_hub`, from a Hub on loopback.

The Hub cannot be reached from tests, so a small HTTP server answers the four requests
`snapshot_download` makes (repo info, file tree, HEAD and GET of each file); it reaches
the store through its `FetchSettings.hf_endpoint` seam.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.model_cache.test_store import cache_entries, write_hf_folder
from volunteer.errors import FetchError, IntegrityError, ModelStoreError
from volunteer.model_cache.fetch import FetchSettings
from volunteer.model_cache.files import read_manifest
from volunteer.model_cache.store import ModelStore, hf_slug

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Hub(http.server.BaseHTTPRequestHandler):
    """Serves `self.server.repos`: repo id -> {file path: bytes}."""

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def _answer(self, *, with_body: bool) -> None:
        parts = unquote(urlparse(self.path).path).strip("/").split("/")
        repos: Mapping[str, Mapping[str, bytes]] = self.server.repos  # type: ignore[attr-defined]
        if parts[:2] == ["api", "models"]:
            repo_id, files = "/".join(parts[2:4]), repos.get("/".join(parts[2:4]))
            if files is None:
                return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, with_body)
            if parts[4] == "revision":
                siblings = [{"rfilename": name} for name in files]
                info = {"id": repo_id, "sha": COMMIT, "siblings": siblings}
                return self._send(200, json.dumps(info).encode(), {}, with_body)
            tree = [
                {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
                for name, data in files.items()
            ]
            return self._send(200, json.dumps(tree).encode(), {}, with_body)
        repo_id, file_name = "/".join(parts[:2]), "/".join(parts[4:])
        data = repos.get(repo_id, {}).get(file_name)
        if parts[2:3] != ["resolve"] or data is None:
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, with_body)
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        headers = {"X-Repo-Commit": COMMIT, "ETag": etag, "Content-Length": str(len(data))}
        if with_body and file_name in self.server.drop_after_bytes:  # type: ignore[attr-defined]
            # The connection breaks mid-file: headers promise more than ever arrives.
            data = data[: self.server.drop_after_bytes[file_name]]  # type: ignore[attr-defined]
        self._send(200, data, headers, with_body)

    def _send(self, status: int, body: bytes, headers: dict[str, str], with_body: bool) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: the test output is for failures."""


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def hub_server() -> Iterator[http.server.ThreadingHTTPServer]:
    """A loopback Hub; tests fill its `repos` and `drop_after_bytes` (file -> cut)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    server.repos = {}  # type: ignore[attr-defined]
    server.drop_after_bytes = {}  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def hub(hub_server: http.server.ThreadingHTTPServer) -> tuple[str, dict[str, dict[str, bytes]]]:
    """The loopback Hub's URL and its (editable) repos."""
    return f"http://127.0.0.1:{hub_server.server_port}", hub_server.repos  # type: ignore[attr-defined]


def repo_files(tmp_path: Path, **config: object) -> dict[str, bytes]:
    """A tiny model repo, plus files the store must not download."""
    folder = write_hf_folder(tmp_path / "repo", **config)
    files = {path.name: path.read_bytes() for path in folder.iterdir()}
    files["tokenizer.json"] = b'{"model": {}}'
    files["README.md"] = b"# tiny"
    files["pytorch_model.bin"] = b"\0" * 64
    files["onnx/model.onnx"] = b"\0" * 64
    return files


@pytest.fixture
def store(tmp_path: Path, hub: tuple[str, dict[str, dict[str, bytes]]]) -> ModelStore:
    settings = FetchSettings(hf_endpoint=hub[0], hf_cache_dir=tmp_path / "hf-cache")
    return ModelStore(tmp_path / "cache" / "models", fetch=settings)


def test_pull_takes_only_weights_json_and_tokenizer(
    store: ModelStore, hub: tuple[str, dict[str, dict[str, bytes]]], tmp_path: Path
) -> None:
    hub[1][REPO] = repo_files(tmp_path)

    folder = store.pull(REPO, progress=False)

    assert folder == store.models_dir / hf_slug(REPO)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert names == [
        "config.json", "model.safetensors", "tokenizer.json", "volunteer-manifest.json",
    ]  # fmt: skip
    manifest = read_manifest(folder)
    assert manifest.name == REPO and manifest.source == f"huggingface:{REPO}"
    assert (folder / "model.safetensors").read_bytes() == hub[1][REPO]["model.safetensors"]
    assert store.verify(REPO).files_checked == 3
    assert [row.name for row in store.list() if row.is_pulled] == [REPO]


def test_cached_repo_needs_no_network(
    store: ModelStore, hub: tuple[str, dict[str, dict[str, bytes]]], tmp_path: Path
) -> None:
    hub[1][REPO] = repo_files(tmp_path)
    folder = store.pull(REPO, progress=False)
    hub[1].clear()

    assert store.resolve(REPO) == folder
    assert store.verify(hf_slug(REPO)).is_hashed


def test_missing_repo_says_it_may_be_gated(store: ModelStore) -> None:
    with pytest.raises(FetchError, match=r"does not exist, or it is gated/private"):
        store.pull("nobody/nothing", progress=False)
    assert cache_entries(store) == []


def test_connection_lost_mid_download_is_a_fetch_error(
    store: ModelStore,
    hub: tuple[str, dict[str, dict[str, bytes]]],
    hub_server: http.server.ThreadingHTTPServer,
    tmp_path: Path,
) -> None:
    hub[1][REPO] = repo_files(tmp_path)
    hub_server.drop_after_bytes["model.safetensors"] = 20  # type: ignore[attr-defined]

    with pytest.raises(FetchError, match=rf"cannot download {REPO}.*check the network"):
        store.pull(REPO, progress=False)
    assert cache_entries(store) == []


def test_truncated_download_is_refused(
    store: ModelStore, hub: tuple[str, dict[str, dict[str, bytes]]], tmp_path: Path
) -> None:
    files = repo_files(tmp_path)
    files["model.safetensors"] = files["model.safetensors"][:-8]
    hub[1][REPO] = files

    with pytest.raises(IntegrityError, match=r"model\.safetensors is truncated.*pull again"):
        store.pull(REPO, progress=False)
    assert cache_entries(store) == []


def test_repo_of_another_architecture_is_refused(
    store: ModelStore, hub: tuple[str, dict[str, dict[str, bytes]]], tmp_path: Path
) -> None:
    hub[1][REPO] = repo_files(tmp_path, model_type="gpt_neox")

    with pytest.raises(ModelStoreError, match=rf"{REPO} has an unusable config.json.*gpt_neox"):
        store.pull(REPO, progress=False)
    assert cache_entries(store) == []


def test_repo_without_safetensors_is_refused(
    store: ModelStore, hub: tuple[str, dict[str, dict[str, bytes]]], tmp_path: Path
) -> None:
    files = repo_files(tmp_path)
    del files["model.safetensors"]
    hub[1][REPO] = files

    with pytest.raises(ModelStoreError, match=r"no \*\.safetensors weights"):
        store.pull(REPO, progress=False)
    assert cache_entries(store) == []


def test_sharded_repo_keeps_its_index(
    store: ModelStore, hub: tuple[str, dict[str, dict[str, bytes]]], tmp_path: Path
) -> None:
    files = repo_files(tmp_path)
    del files["model.safetensors"]
    shards = {"model-00001-of-00002.safetensors": "a", "model-00002-of-00002.safetensors": "b"}
    for shard, tensor in shards.items():
        save_file({tensor: np.zeros(4, np.float32)}, tmp_path / shard)
        files[shard] = (tmp_path / shard).read_bytes()
    index = {"weight_map": {tensor: shard for shard, tensor in shards.items()}}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    hub[1][REPO] = files

    folder = store.pull(REPO, progress=False)

    assert (folder / "model.safetensors.index.json").is_file()
    assert store.verify(REPO).files_checked == 5
