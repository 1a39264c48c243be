"""The named-adapter store on real files: round trips, refusals, damage and atomic saves."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from volunteer.models.adapters import LORA_TARGETS
from volunteer.models.config import ModelConfig

from volunteer.finetune.adapter_info import (
    AdapterError,
    AdapterInfo,
    check_compatible,
    expected_shapes,
    valid_name,
)
from volunteer.finetune.params import METHODS
from volunteer.finetune.store import AdapterStore, BrokenAdapter
from volunteer.paths import Paths

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelConfig(
    arch="llama",
    vocab_size=97,
    hidden_size=16,
    intermediate_size=40,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=4,
)
"""q_size 16, kv_size 8: qkv 16 -> 32, o 16 -> 16, gate_up 16 -> 80, down 40 -> 16."""
MODEL = "tiny-llama"


def make_info(name: str = "a1", method: str = "lora", **changes: object) -> AdapterInfo:
    base = AdapterInfo(
        name=name,
        method=method,
        model=MODEL,
        num_layers=TINY.num_layers,
        hidden_size=TINY.hidden_size,
        prompt_len=0 if method == "lora" else 5,
        rank=4 if method == "lora" else 0,
        alpha=8.0,
        targets=LORA_TARGETS if method == "lora" else (),
        steps=120,
        train_loss=1.25,
        heldout_loss=1.5,
        data="train.jsonl",
        created="2025-01-02T03:04:05+00:00",
    )
    return dataclasses.replace(base, **changes)


def make_tensors(info: AdapterInfo, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(info, TINY)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "adapters")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _entries(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir())


def test_expected_shapes_follow_the_format() -> None:
    lora = expected_shapes(make_info(), TINY)
    assert lora == {
        "lora.qkv.a": (3, 4, 16), "lora.qkv.b": (3, 32, 4),
        "lora.o.a": (3, 4, 16), "lora.o.b": (3, 16, 4),
        "lora.gate_up.a": (3, 4, 16), "lora.gate_up.b": (3, 80, 4),
        "lora.down.a": (3, 4, 40), "lora.down.b": (3, 16, 4),
    }  # fmt: skip
    assert expected_shapes(make_info(method="ptune"), TINY) == {"prompt": (5, 16)}
    deep = expected_shapes(make_info(method="deep_ptune"), TINY)
    assert deep == {"prompt": (5, 16), "deep_prompts": (3, 5, 16)}


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_for_each_method(store: AdapterStore, method: str) -> None:
    info = make_info(name=f"my-{method}.v1", method=method)
    tensors = make_tensors(info)

    folder = store.save(info, tensors)

    assert folder == store.root / info.name
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors"]
    loaded_info, loaded = store.load(info.name)
    assert loaded_info == info
    _assert_same(loaded, tensors)
    assert store.info(info.name) == info
    assert store.load(info.name, config=TINY)[0] == info
    assert json.loads((folder / "adapter.json").read_text())["targets"] == list(info.targets)


def test_a_lora_adapter_with_some_targets_and_bf16(store: AdapterStore) -> None:
    info = make_info(targets=("o", "qkv"))
    tensors = {k: t.to(torch.bfloat16) for k, t in make_tensors(info).items()}
    store.save(info, tensors)
    loaded = store.load(info.name)[1]
    assert loaded["lora.qkv.b"].dtype == torch.bfloat16
    _assert_same(loaded, tensors)


def test_save_refuses_an_existing_name_unless_replace(store: AdapterStore) -> None:
    info = make_info()
    first, second = make_tensors(info, seed=1), make_tensors(info, seed=2)
    store.save(info, first)

    with pytest.raises(AdapterError, match="adapter a1 already exists"):
        store.save(info, second)
    _assert_same(store.load("a1")[1], first)

    store.save(dataclasses.replace(info, steps=240), second, replace=True)
    loaded_info, loaded = store.load("a1")
    assert loaded_info.steps == 240
    _assert_same(loaded, second)
    assert _entries(store.root) == ["a1"]  # nothing left aside


@pytest.mark.parametrize("name", ["../x", "", ".hidden", "a/b", "a\\b", "x" * 65, "-a", "é"])
def test_bad_names_are_refused_everywhere(store: AdapterStore, name: str) -> None:
    with pytest.raises(AdapterError, match="invalid adapter name"):
        valid_name(name)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        make_info(name=name)
    for call in (store.load, store.info, store.delete, store.checkpoint_load):
        with pytest.raises(AdapterError, match="invalid adapter name"):
            call(name)
    assert not store.root.exists()


def test_good_names() -> None:
    assert valid_name("a") == "a"
    assert valid_name("Q4.lora_v2-final") == "Q4.lora_v2-final"
    assert valid_name("x" * 64) == "x" * 64


def test_save_refuses_tensors_that_do_not_fit_the_info(store: AdapterStore) -> None:
    info = make_info()
    tensors = make_tensors(info)
    wrong = {**tensors, "lora.o.b": torch.zeros(3, 17, 4)}
    with pytest.raises(
        AdapterError, match=r"tensor lora.o.b has shape \[3, 17, 4\], not \[3, 16, 4\]"
    ):
        store.save(info, wrong)
    missing = {k: t for k, t in tensors.items() if k != "lora.down.a"}
    with pytest.raises(AdapterError, match=r"adapter a1: its tensors lack lora\.down\.a"):
        store.save(info, missing)
    extra = {**tensors, "prompt": torch.zeros(5, 16)}
    with pytest.raises(AdapterError, match="have unexpected prompt"):
        store.save(info, extra)
    nan = {**tensors, "lora.qkv.a": torch.full((3, 4, 16), float("nan"))}
    with pytest.raises(AdapterError, match=r"lora\.qkv\.a holds non-finite values"):
        store.save(info, nan)
    ints = {**tensors, "lora.qkv.a": torch.zeros(3, 4, 16, dtype=torch.int32)}
    with pytest.raises(AdapterError, match=r"lora\.qkv\.a is not a float tensor"):
        store.save(info, ints)
    assert not store.root.exists() or _entries(store.root) == []


def test_save_copies_tensors_that_share_memory(store: AdapterStore) -> None:
    info = make_info(method="deep_ptune")
    deep = torch.randn(3, 5, 16)
    store.save(info, {"prompt": deep[0], "deep_prompts": deep})  # a view of another tensor
    loaded = store.load(info.name)[1]
    assert torch.equal(loaded["prompt"], deep[0])


def _write_raw(store: AdapterStore, info: AdapterInfo, tensors: dict[str, torch.Tensor]) -> Path:
    """An adapter folder written by hand, past the store's checks (as damage would)."""
    folder = store.root / info.name
    folder.mkdir(parents=True)
    (folder / "adapter.json").write_text(json.dumps(info.to_json()))
    safetensors.torch.save_file(tensors, folder / "adapter.safetensors")
    return folder


def test_load_names_a_wrong_shape_a_missing_tensor_and_non_finite_values(
    store: AdapterStore,
) -> None:
    info = make_info(name="shapes", method="deep_ptune")
    good = make_tensors(info)
    _write_raw(store, info, {**good, "deep_prompts": torch.zeros(3, 6, 16)})
    with pytest.raises(AdapterError, match=r"adapter shapes is damaged: tensor deep_prompts"):
        store.load("shapes")

    info = make_info(name="missing", method="deep_ptune")
    _write_raw(store, info, {"prompt": good["prompt"]})
    with pytest.raises(AdapterError, match="adapter missing is damaged: its tensors lack"):
        store.load("missing")

    info = make_info(name="inf", method="deep_ptune")
    _write_raw(store, info, {**good, "prompt": torch.full((5, 16), float("inf"))})
    with pytest.raises(AdapterError, match="adapter inf is damaged: tensor prompt holds non"):
        store.load("inf")


def test_load_checks_lora_widths_against_a_config(store: AdapterStore) -> None:
    info = make_info(targets=("gate_up",))
    other = dataclasses.replace(TINY, intermediate_size=48)
    store.save(info, {
        "lora.gate_up.a": torch.zeros(3, 4, 16), "lora.gate_up.b": torch.zeros(3, 96, 4)
    })  # fmt: skip
    assert store.load("a1", config=other)[0] == info  # the widths fit the other model
    with pytest.raises(AdapterError, match=r"lora.gate_up.b has shape \[3, 96, 4\], not \[3, 80"):
        store.load("a1", config=TINY)


def test_load_refuses_damaged_files(store: AdapterStore) -> None:
    info = make_info(method="ptune")
    folder = store.save(info, make_tensors(info))
    weights = folder / "adapter.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data + b"\0" * 8)
    with pytest.raises(AdapterError, match=r"adapter a1 is damaged: adapter\.safetensors"):
        store.load("a1")
    weights.write_bytes(data + b"\0" * (1 << 20))  # far larger than the info allows
    with pytest.raises(AdapterError, match="more than its settings allow"):
        store.load("a1")
    weights.write_bytes(data[:-4])
    with pytest.raises(AdapterError, match=r"adapter a1 is damaged: adapter\.safetensors"):
        store.load("a1")
    weights.write_bytes(b"\xff" * 8 + data[8:])  # a header length beyond the file
    with pytest.raises(AdapterError, match="adapter a1 is damaged"):
        store.load("a1")
    weights.unlink()
    with pytest.raises(AdapterError, match=r"adapter a1 is damaged: adapter\.safetensors"):
        store.load("a1")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "adapter.json"),
        ('"a string"', "not a JSON object"),
        (" " * (64 * 1024 + 1), "over 65536 bytes"),
        (None, "lack steps"),
        ({"num_layers": "3"}, "num_layers '3' is out of range"),
        ({"num_layers": True}, "num_layers True is out of range"),
        ({"hidden_size": 0}, "hidden_size 0 is out of range"),
        ({"method": "prefix"}, "method 'prefix' is not one of"),
        ({"targets": ["qkv", "mlp"]}, "bad targets"),
        ({"targets": ["qkv", "qkv"]}, "bad targets"),
        ({"targets": "qkv"}, "bad targets"),
        ({"train_loss": "NaN"}, "train_loss 'NaN' is not a finite number"),
        ({"alpha": 10**400}, "alpha 1000"),
        ({"heldout_loss": float("inf")}, "heldout_loss inf is not a finite number"),
        ({"created": "2025-01-02T03:04:05+02:00"}, "not an ISO time in UTC"),
        ({"created": "yesterday"}, "not an ISO time in UTC"),
        ({"model": "a\x1b[2Jb"}, "model is not printable"),
        ({"version": 2}, "format version 2 is not supported"),
        ({"name": "other"}, "its adapter.json names other"),
    ],
)
def test_load_refuses_bad_settings(store: AdapterStore, text: object, match: str) -> None:
    info = make_info()
    folder = store.save(info, make_tensors(info))
    raw = info.to_json()
    if isinstance(text, dict):
        text = json.dumps({**raw, **text})
    elif text is None:
        text = json.dumps({k: v for k, v in raw.items() if k != "steps"})
    (folder / "adapter.json").write_text(str(text))

    with pytest.raises(AdapterError, match="adapter a1 is damaged") as caught:
        store.load("a1")
    assert match in str(caught.value)
    with pytest.raises(AdapterError, match=match.replace("[", r"\[")):
        store.info("a1")


def test_settings_ignore_unknown_keys_and_accept_z_times() -> None:
    raw = {**make_info().to_json(), "from_the_future": 1, "created": "2025-01-02T03:04:05Z"}
    assert AdapterInfo.from_json(raw).created == "2025-01-02T03:04:05Z"


def test_delete(store: AdapterStore) -> None:
    info = make_info()
    folder = store.save(info, make_tensors(info))

    assert store.delete("a1") == folder
    assert not folder.exists() and _entries(store.root) == []
    with pytest.raises(AdapterError, match="no adapter named a1"):
        store.delete("a1")
    with pytest.raises(AdapterError, match="no adapter named a1"):
        store.load("a1")


def test_list_is_sorted_and_shows_a_broken_entry(store: AdapterStore) -> None:
    for name, method in (("zeta", "lora"), ("alpha", "ptune"), ("mid", "deep_ptune")):
        info = make_info(name=name, method=method)
        store.save(info, make_tensors(info))
    (store.root / "mid" / "adapter.safetensors").write_bytes(b"garbage")
    (store.root / "empty").mkdir()
    (store.root / ".tmp-left-behind").mkdir()
    (store.root / "stray-file").write_text("not an adapter")
    info = make_info(name="zeta")
    store.checkpoint_save("zeta", info, make_tensors(info), {}, {"step": 1})

    rows = store.list()

    assert [row.name for row in rows] == ["alpha", "empty", "mid", "zeta"]
    assert isinstance(rows[0], AdapterInfo) and rows[0].method == "ptune"
    assert isinstance(rows[1], BrokenAdapter) and "adapter.json" in rows[1].reason
    assert isinstance(rows[2], BrokenAdapter) and "adapter mid is damaged" in rows[2].reason
    assert rows[2].path == store.root / "mid"
    assert isinstance(rows[3], AdapterInfo)


def test_list_of_a_store_never_written(store: AdapterStore) -> None:
    assert store.list() == []


def test_check_compatible() -> None:
    info = make_info()
    check_compatible(info, TINY, MODEL)

    with pytest.raises(AdapterError) as caught:
        check_compatible(info, dataclasses.replace(TINY, num_layers=30, hidden_size=576), "big")
    assert str(caught.value) == (
        "adapter a1 was trained for tiny-llama (3 layers, hidden 16), "
        "not big (30 layers, hidden 576)"
    )
    with pytest.raises(AdapterError, match="not other-model"):
        check_compatible(info, TINY, "other-model")


def test_checkpoint_round_trip_replace_and_delete(store: AdapterStore) -> None:
    info = make_info(name="run", method="deep_ptune", steps=10)
    tensors = make_tensors(info)
    optimizer = {f"{k}.exp_avg": torch.randn_like(t) for k, t in tensors.items()}
    optimizer["step"] = torch.tensor(10.0)
    progress = {"step": 10, "epoch": 0, "position": 1234, "seed": 7}
    assert store.checkpoint_load("run") is None

    folder = store.checkpoint_save("run", info, tensors, optimizer, progress)

    assert folder == store.root / ".checkpoints" / "run"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter.json", "adapter.safetensors", "optimizer.safetensors", "progress.json"
    ]  # fmt: skip
    loaded = store.checkpoint_load("run")
    assert loaded is not None
    assert loaded[0] == info and loaded[3] == progress
    _assert_same(loaded[1], tensors)
    _assert_same(loaded[2], optimizer)
    assert store.list() == []  # a checkpoint is no adapter

    later = dataclasses.replace(info, steps=20)
    store.checkpoint_save("run", later, tensors, optimizer, {**progress, "step": 20})
    loaded = store.checkpoint_load("run")
    assert loaded is not None and loaded[0].steps == 20 and loaded[3]["step"] == 20
    assert _entries(store.root / ".checkpoints") == ["run"]

    assert store.checkpoint_delete("run") is True
    assert store.checkpoint_delete("run") is False
    assert store.checkpoint_load("run") is None


def test_checkpoint_refusals_and_damage(store: AdapterStore) -> None:
    info = make_info(name="run")
    tensors = make_tensors(info)
    with pytest.raises(AdapterError, match="its settings name adapter run"):
        store.checkpoint_save("other", info, tensors, {}, {})
    with pytest.raises(AdapterError, match="cannot be written as JSON"):
        store.checkpoint_save("run", info, tensors, {}, {"loss": float("nan")})

    folder = store.checkpoint_save("run", info, tensors, {}, {"step": 1})
    (folder / "progress.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match=r"training checkpoint of run: progress\.json is not"):
        store.checkpoint_load("run")
    (folder / "optimizer.safetensors").write_bytes(b"\0" * (1 << 20))
    with pytest.raises(AdapterError, match="training checkpoint of run is damaged: optimizer"):
        store.checkpoint_load("run")


def test_the_store_of_paths_lives_in_the_data_dir(tmp_path: Path) -> None:
    paths = Paths.resolve(home=tmp_path, env={})
    assert AdapterStore.of(paths).root == tmp_path / "data" / "adapters"


_FAILING_SAVE = """
import errno, resource, signal, sys, torch
from pathlib import Path
from tests.finetune.test_store import make_info, make_tensors
from volunteer.finetune.adapter_info import AdapterError
from volunteer.finetune.store import AdapterStore

store = AdapterStore(Path(sys.argv[1]))
info = make_info(method="ptune")
store.save(info, make_tensors(info, seed=1))
# Files may grow to 64 KiB no more: the big adapter's write fails, as on a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
big = make_info(method="ptune", prompt_len=4096)
for replace in (False, True):
    name = "a1" if replace else "a2"
    try:
        import dataclasses
        store.save(dataclasses.replace(big, name=name), make_tensors(big), replace=replace)
    except OSError as exc:
        print("failed", errno.errorcode[exc.errno])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_failed_save_keeps_the_earlier_adapter_and_leaves_no_temp(store: AdapterStore) -> None:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FAILING_SAVE), str(store.root)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip

    assert out.stdout.split("\n")[:2] == ["failed EFBIG", "failed EFBIG"], out
    assert _entries(store.root) == ["a1"]
    info, tensors = store.load("a1")
    assert info.prompt_len == 5
    _assert_same(tensors, make_tensors(info, seed=1))


def test_a_replace_that_fails_to_publish_puts_the_old_adapter_back(
    store: AdapterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The one window a real disk cannot be made to hit on cue: the final rename.
    import errno

    import volunteer.finetune.store as module

    info = make_info()
    store.save(info, make_tensors(info, seed=1))

    def full_disk(tmp: Path, dest: Path) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "publish_dir", full_disk)
    with pytest.raises(AdapterError, match="no space left on the disk to save a1"):
        store.save(info, make_tensors(info, seed=2), replace=True)

    assert _entries(store.root) == ["a1"]
    _assert_same(store.load("a1")[1], make_tensors(info, seed=1))
