"""`volunteer adapters list | show | delete` against a real store under --home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.finetune.test_store import make_info, make_tensors
from volunteer.cli import main
from volunteer.finetune.store import AdapterStore


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    """The store `--home tmp_path` uses, with a LoRA and a p-tuning adapter."""
    store = AdapterStore(tmp_path / "data" / "adapters")
    for name, method in (("chat-lora", "lora"), ("alpha.ptune", "ptune")):
        info = make_info(name=name, method=method)
        store.save(info, make_tensors(info))
    return store


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--home", str(tmp_path), "adapters", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_prints_a_row_per_adapter_and_marks_a_damaged_one(
    tmp_path: Path, store: AdapterStore, capsys: pytest.CaptureFixture[str]
) -> None:
    (store.root / "zz-broken").mkdir()
    (store.root / "zz-broken" / "adapter.json").write_text("{")

    code, out, err = run(tmp_path, capsys, "list")

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME", "METHOD", "MODEL", "STEPS", "TRAIN", "HELD-OUT", "SIZE", "CREATED"
    ]  # fmt: skip
    assert lines[1].split()[:6] == ["alpha.ptune", "ptune", "tiny-llama", "120", "1.2500", "1.5000"]
    assert lines[2].split()[:2] == ["chat-lora", "lora"]
    assert lines[3].startswith("zz-broken  DAMAGED: adapter zz-broken is damaged: adapter.json")
    assert lines[4] == f"adapters: {store.root}"


def test_list_json(tmp_path: Path, store: AdapterStore, capsys: pytest.CaptureFixture[str]) -> None:
    (store.root / "broken").mkdir()

    code, out, _ = run(tmp_path, capsys, "list", "--json")

    assert code == 0
    reply = json.loads(out)
    assert reply["root"] == str(store.root)
    assert [a["name"] for a in reply["adapters"]] == ["alpha.ptune", "chat-lora"]
    lora = reply["adapters"][1]
    assert lora["method"] == "lora" and lora["targets"] == ["qkv", "o", "gate_up", "down"]
    assert lora["size_bytes"] > 0 and lora["path"] == str(store.root / "chat-lora")
    assert [b["name"] for b in reply["broken"]] == ["broken"]


def test_list_with_no_adapters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(tmp_path, capsys, "list")
    assert code == 0 and out.startswith("no adapters yet in ")


def test_show_prints_settings_losses_shapes_and_size(
    tmp_path: Path, store: AdapterStore, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(tmp_path, capsys, "show", "chat-lora")

    assert (code, err) == (0, "")
    assert "method:    lora (rank 4, alpha 8, targets qkv, o, gate_up, down)" in out
    assert "model:     tiny-llama (3 layers, hidden 16)" in out
    assert "trained:   120 steps on train.jsonl" in out
    assert "losses:    train 1.2500, held-out 1.5000" in out
    assert f" in {store.root / 'chat-lora'}" in out
    assert "  lora.gate_up.b  [3, 80, 4]  float32" in out


def test_show_json(tmp_path: Path, store: AdapterStore, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(tmp_path, capsys, "show", "alpha.ptune", "--json")

    assert code == 0
    reply = json.loads(out)
    assert reply["name"] == "alpha.ptune" and reply["prompt_len"] == 5
    assert reply["tensors"] == {"prompt": {"shape": [5, 16], "dtype": "float32"}}
    assert reply["heldout_loss"] == 1.5 and reply["size_bytes"] > 0


def test_show_of_a_missing_a_damaged_and_a_bad_name_fails(
    tmp_path: Path, store: AdapterStore, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(tmp_path, capsys, "show", "nope")
    assert (code, out) == (1, "")
    assert err.startswith("volunteer: error: no adapter named nope")

    weights = store.root / "chat-lora" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    code, _, err = run(tmp_path, capsys, "show", "chat-lora")
    assert code == 1 and "volunteer: error: adapter chat-lora is damaged" in err

    code, _, err = run(tmp_path, capsys, "show", "../x")
    assert code == 1 and "volunteer: error: invalid adapter name '../x'" in err


def test_delete_removes_the_adapter_and_its_checkpoint(
    tmp_path: Path, store: AdapterStore, capsys: pytest.CaptureFixture[str]
) -> None:
    info = make_info(name="chat-lora")
    store.checkpoint_save("chat-lora", info, make_tensors(info), {"s": torch.ones(1)}, {})

    code, out, err = run(tmp_path, capsys, "delete", "chat-lora")

    assert (code, err) == (0, "")
    assert out.startswith("removed adapter chat-lora (")
    assert f"{store.root / 'chat-lora'})" in out
    assert "removed the training checkpoint of chat-lora" in out
    assert [row.name for row in store.list()] == ["alpha.ptune"]
    assert store.checkpoint_load("chat-lora") is None

    code, out, err = run(tmp_path, capsys, "delete", "chat-lora")
    assert (code, out) == (1, "")
    assert err.startswith("volunteer: error: no adapter named chat-lora")


def test_delete_of_a_lone_checkpoint(
    tmp_path: Path, store: AdapterStore, capsys: pytest.CaptureFixture[str]
) -> None:
    info = make_info(name="unfinished")
    store.checkpoint_save("unfinished", info, make_tensors(info), {}, {"step": 3})

    code, out, _ = run(tmp_path, capsys, "delete", "unfinished")

    assert (code, out) == (0, "removed the training checkpoint of unfinished\n")


def test_the_installed_command_runs(tmp_path: Path, store: AdapterStore) -> None:
    env = {k: v for k, v in os.environ.items() if k != "VOLUNTEER_HOME"}
    result = subprocess.run(
        [sys.executable, "-m", "volunteer", "--home", str(tmp_path), "adapters", "list"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "chat-lora" in result.stdout
