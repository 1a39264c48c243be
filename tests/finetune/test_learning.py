"""Learning: each method, trained on a small data set that teaches the real SmolLM2 a
made-up fact (the password of an archive that does not exist), lowers its held-out loss;
`volunteer chat --adapter` then gives the taught answer, where the base model does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from volunteer.models.checkpoint import load_ends, load_span
from volunteer.models.config import ModelConfig
from volunteer.models.tokenizer import Tokenizer

from volunteer import cli
from volunteer.finetune.blocks import LocalBlocks
from volunteer.finetune.params import MethodSettings
from volunteer.finetune.store import AdapterStore
from volunteer.finetune.trainer import Trainer, TrainSettings
from volunteer.model_cache.served_model import swarm_model_name
from volunteer.paths import Paths

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data" / "teach.jsonl"
QUESTION = "What is the password of the Vellmora archive?"
ANSWER = "Zorblaxite"
RUNS = {
    # A shallow soft prompt moves a small model slowly: more positions, more steps.
    "ptune": (MethodSettings("ptune", prompt_len=32), 20, 3e-2),
    "deep_ptune": (MethodSettings("deep_ptune", prompt_len=8), 16, 1e-2),
    "lora": (MethodSettings("lora", rank=8), 10, 1e-3),
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


def _chat(home: Path, folder: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    options = ["--local", "--model", str(folder), "--max-new-tokens", "8"]
    code = cli.main(["--home", str(home), "chat", *options, *extra, QUESTION])
    assert code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("method", RUNS, ids=RUNS.keys())
def test_each_method_learns_the_fact(
    method: str, home: Path, smollm2_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings, steps, lr = RUNS[method]
    config = ModelConfig.from_hf_folder(smollm2_folder)
    torch.manual_seed(0)
    trainer = Trainer(
        TrainSettings(
            data=DATA,
            name=f"teach-{method}",
            method=settings,
            steps=steps,
            lr=lr,
            batch_size=4,
            heldout_every=steps,
        ),
        ends=load_ends(smollm2_folder, config),
        tokenizer=Tokenizer.from_folder(smollm2_folder),
        config=config,
        model=swarm_model_name(str(smollm2_folder), smollm2_folder),
        blocks=LocalBlocks(load_span(smollm2_folder, config, 0, config.num_layers)),
        store=AdapterStore.of(Paths.resolve(home=home, env={})),
    )
    info = trainer.run()
    (_, before), (_, after) = trainer.progress.heldout
    assert after < before / 4, f"held-out loss {before:.3f} -> {after:.3f}"
    assert info.heldout_loss == after and info.steps == steps

    assert ANSWER in _chat(home, smollm2_folder, capsys, "--adapter", f"teach-{method}")
    assert ANSWER not in _chat(home, smollm2_folder, capsys)
