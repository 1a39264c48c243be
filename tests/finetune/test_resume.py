"""A stopped run saves a checkpoint, and resuming it ends exactly where an uninterrupted
run ends; bad input to `volunteer finetune` and `volunteer chat --adapter` is refused
with a clear error that names the problem, and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from volunteer.models.checkpoint import load_ends, load_span
from volunteer.models.config import ModelConfig
from volunteer.models.tokenizer import Tokenizer

from volunteer import cli
from volunteer.finetune import trainer as trainer_module
from volunteer.finetune.blocks import LocalBlocks
from volunteer.finetune.data import batches
from volunteer.finetune.params import MethodSettings
from volunteer.finetune.store import AdapterStore
from volunteer.finetune.trainer import Stopped, Trainer, TrainSettings
from volunteer.model_cache.served_model import swarm_model_name
from volunteer.paths import Paths

DATA = Path(__file__).parent / "data" / "teach.jsonl"


def _trainer(folder: Path, store: AdapterStore, *, name: str, stop_at: int | None) -> Trainer:
    config = ModelConfig.from_hf_folder(folder)
    trainer: Trainer

    def should_stop() -> bool:
        return stop_at is not None and trainer.progress.step == stop_at

    trainer = Trainer(
        TrainSettings(
            data=DATA,
            name=name,
            method=MethodSettings("lora", rank=2, targets=("o",)),
            steps=4,
            batch_size=2,
            heldout_every=2,
        ),
        ends=load_ends(folder, config),
        tokenizer=Tokenizer.from_folder(folder),
        config=config,
        model="smol",
        blocks=LocalBlocks(load_span(folder, config, 0, config.num_layers)),
        store=store,
        should_stop=should_stop,
    )
    return trainer


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_same_adapter(smollm2_folder: Path, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters")
    uninterrupted = _trainer(smollm2_folder, store, name="whole", stop_at=None)
    uninterrupted.run()
    stopped = _trainer(smollm2_folder, store, name="parts", stop_at=2)
    with pytest.raises(Stopped, match="stopped at step 2"):
        stopped.run()
    assert store.checkpoint_load("parts") is not None
    assert [each.name for each in store.list()] == ["whole"]  # none until the run ends
    resumed = _trainer(smollm2_folder, store, name="parts", stop_at=None)
    info = resumed.run()
    assert store.checkpoint_load("parts") is None
    assert info.steps == 4
    assert resumed.progress.losses == pytest.approx(uninterrupted.progress.losses, rel=1e-5)
    _, whole_tensors = store.load("whole")
    _, part_tensors = store.load("parts")
    for key, value in whole_tensors.items():
        torch.testing.assert_close(part_tensors[key], value, atol=1e-6, rtol=1e-5)


def _finetune(home: Path, folder: Path, data: Path, *extra: str) -> int:
    options = ["--local", "--model", str(folder), "--steps", "1", "--batch-size", "2"]
    return cli.main(["--home", str(home), "finetune", str(data), *options, *extra])


def test_malformed_or_empty_data_is_refused_with_its_line(
    smollm2_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "fine"})
    bad.write_text(f"{good}\n{{not json\n")
    assert _finetune(tmp_path, smollm2_folder, bad) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert _finetune(tmp_path, smollm2_folder, empty) == 1
    assert "no examples" in capsys.readouterr().err
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "word " * 9000}) + "\n")
    assert _finetune(tmp_path, smollm2_folder, long) == 1
    assert "long.jsonl:1" in capsys.readouterr().err
    assert AdapterStore.of(Paths.resolve(home=tmp_path, env={})).list() == []


def test_bad_settings_are_refused_before_anything_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flags, said in [
        (["--steps", "0"], "--steps"),
        (["--method", "lora", "--rank", "0"], "--rank"),
        (["--lr", "-1"], "--lr"),
        (["--name", "../up"], "invalid adapter name"),
    ]:
        code = cli.main(["--home", str(tmp_path), "finetune", str(DATA), "--local", *flags])
        assert code == 1
        assert said in capsys.readouterr().err


def test_an_adapter_of_another_model_is_refused(
    smollm2_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ModelConfig.from_hf_folder(smollm2_folder)
    store = AdapterStore.of(Paths.resolve(home=tmp_path, env={}))
    trainer = _trainer(smollm2_folder, store, name="elsewhere", stop_at=None)
    trainer.model = "some-other-model"
    trainer.settings = TrainSettings(
        data=DATA, name="elsewhere", method=trainer.settings.method, steps=1, batch_size=2
    )
    trainer.run()
    assert swarm_model_name(str(smollm2_folder), smollm2_folder) != "some-other-model"
    options = ["--local", "--model", str(smollm2_folder), "--adapter", "elsewhere"]
    code = cli.main(["--home", str(tmp_path), "chat", *options, "hello"])
    assert code == 1
    error = capsys.readouterr().err
    assert "elsewhere" in error and "some-other-model" in error
    assert config.num_layers


def test_a_batch_larger_than_a_call_runs_as_calls_with_the_same_gradient(
    smollm2_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = _trainer(smollm2_folder, AdapterStore(tmp_path), name="split", stop_at=None)
    train, _ = trainer.load_data()
    batch = next(batches(train, 4, pad_id=0, seed=0, epoch=0))
    with torch.no_grad():  # away from LoRA's zero start: every gradient path live
        for param in trainer.params.parameters():
            param.add_(0.01)

    def gradients() -> tuple[float, dict[str, torch.Tensor]]:
        trainer.params.zero_grad()
        loss, _ = trainer._batch_loss(batch, learn=True)
        return loss, {name: p.grad.clone() for name, p in trainer.params.named_parameters()}

    whole_loss, whole = gradients()
    monkeypatch.setattr(trainer_module, "MAX_CALL_POSITIONS", batch.input_ids.shape[1])
    calls = []
    blocks = trainer.blocks
    trainer.blocks = lambda hidden, adapter: (
        calls.append(hidden.shape[0]) or blocks(hidden, adapter)
    )
    split_loss, split = gradients()
    assert calls == [1, 1, 1, 1]
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    for name, grad in whole.items():
        # Sums in another order (a call per row, other matmul shapes): float32 rounding
        # of about 1e-4 of the largest gradient on some CPUs; a lost row is far more.
        scale = float(grad.abs().max())
        torch.testing.assert_close(split[name], grad, atol=1e-3 * scale, rtol=1e-4)
