"""Gradient parity on the real SmolLM2: each method's trainable gradients through two
servers on 127.0.0.1 (blocks 0:15 and 15:30, float32) equal those of the whole model run
in this process, within 1e-4 relative (and 1e-6 absolute): thirty blocks of float32 sums
in other orders drift further than the tiny model's four."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from volunteer.models.checkpoint import load_ends, load_span
from volunteer.models.config import ModelConfig
from volunteer.models.tokenizer import Tokenizer

from tests.finetune.test_gradient_parity import (
    METHODS,
    client_peer,
    grads_of,
    moved_params,
)
from tests.server import LoopThread
from tests.swarm.block_peers import start_announced, stop_peers
from volunteer.client.swarm_client import SwarmClient
from volunteer.finetune.blocks import LocalBlocks, SwarmBlocks
from volunteer.finetune.data import batches, load_examples

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning"),
]

DATA = Path(__file__).parent / "data" / "teach.jsonl"


def test_swarm_gradients_equal_local_ones_on_smollm2(smollm2_folder: Path) -> None:
    config = ModelConfig.from_hf_folder(smollm2_folder)
    full = load_span(smollm2_folder, config, 0, config.num_layers).requires_grad_(False)
    ends = load_ends(smollm2_folder, config).requires_grad_(False)
    tokenizer = Tokenizer.from_folder(smollm2_folder)
    examples = load_examples(DATA, tokenizer, max_length=128)[:2]
    batch = next(batches(examples, 2, pad_id=tokenizer.eos_token_id, seed=0, epoch=0))
    loop = LoopThread()
    try:
        peers = loop.run(
            start_announced(full, {"a": (0, 15), "b": (15, 30)}, model="tiny-finetune"),
            timeout_s=120,
        )
        p2p, node = loop.run(client_peer(peers["a"]), timeout_s=60)
        client = SwarmClient(
            p2p=p2p, node=node, model="tiny-finetune", num_blocks=30, rng=random.Random(0)
        )
        for name, settings in METHODS.items():
            params = moved_params(settings, config)
            local = grads_of(params, ends, LocalBlocks(full), (batch.input_ids, batch.targets))
            remote = grads_of(
                params, ends, SwarmBlocks(client, loop.loop), (batch.input_ids, batch.targets)
            )
            for key, expected in local.items():
                assert expected.abs().sum() > 0, f"{name}: {key} has no gradient"
                torch.testing.assert_close(remote[key], expected, atol=1e-6, rtol=1e-4)
        loop.run(stop_peers(list(peers.values())), timeout_s=60)
        loop.run(node.shutdown())
        loop.run(p2p.shutdown())
    finally:
        loop.close()
