"""The tiny model the daemon tests train, written as a Hugging Face folder, loads back
through the daemon's own loaders unchanged."""

from __future__ import annotations

from pathlib import Path

import torch
from volunteer.models.checkpoint import load_ends, load_span
from volunteer.models.config import ModelConfig

from tests.server import sub_span
from tests.training.swarm_helpers import tiny_model, write_hf_folder


def test_a_written_folder_loads_back_the_same_model(tmp_path: Path) -> None:
    full, ends = tiny_model()
    folder = write_hf_folder(tmp_path / "tiny", full, ends)
    config = ModelConfig.from_hf_folder(folder)
    span, back = load_span(folder, config, 1, 3), load_ends(folder, config)
    hidden = ends.embed(torch.randint(0, config.vocab_size, (2, 5)))
    with torch.no_grad():
        torch.testing.assert_close(span(hidden), sub_span(full, 1, 3)(hidden))
        torch.testing.assert_close(back.logits(hidden), ends.logits(hidden))
    assert torch.equal(back.embed_tokens.weight, ends.embed_tokens.weight)
