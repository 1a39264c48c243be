"""The model a fine-tuning or adapter chat in this process runs: its ends, tokenizer and
config here, and its blocks here (`--local`) or in a swarm joined from here (`--swarm`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from volunteer.paths import Paths


@dataclasses.dataclass(frozen=True)
class ModelHere:
    name: str
    """The model's name in the swarm (what adapters record)."""
    folder: Path
    config: object
    ends: object
    tokenizer: object


@contextlib.contextmanager
def open_here(
    name: str, paths: Paths, *, swarm: Sequence[str] | None
) -> Iterator[tuple[ModelHere, object]]:
    """(the model, its blocks): every block loaded here when `swarm` is None, else a
    `SwarmBlocks` over a connection to those peers, closed at exit."""
    from volunteer.finetune.blocks import LocalBlocks, SwarmBlocks
    from volunteer.model_cache.served_model import open_model
    from volunteer.models.checkpoint import load_ends, load_span
    from volunteer.models.tokenizer import Tokenizer

    model = open_model(name, paths.models_dir)
    config = model.config
    here = ModelHere(
        name=model.swarm_name,
        folder=model.folder,
        config=config,
        ends=load_ends(model.folder, config),
        tokenizer=Tokenizer.from_folder(model.folder),
    )
    if swarm is None:
        yield here, LocalBlocks(load_span(model.folder, config, 0, config.num_layers))
        return
    from volunteer.machine.lean_imports import import_hivemind

    import_hivemind()
    from volunteer.client.swarm_connection import SwarmConnection
    from volunteer.daemon.local_checks import local_blocks
    from volunteer.machine.weight_choice import resolve_format
    from volunteer.model_cache.weights_hash import weights_hash
    from volunteer.settings import Settings

    # Through servers holding the weights as the `dtype` setting says (as a daemon here
    # would serve them), checked in that form.
    fmt = resolve_format(Settings.build(paths=paths, env=os.environ, flags={}).dtype)
    with SwarmConnection(swarm) as connection:
        client = connection.client(
            model=model.swarm_name,
            num_blocks=config.num_layers,
            weights_hash=weights_hash(model.folder),
            weights_format=fmt.label,
            config=config,
            verify="sample",
            local_blocks=local_blocks(model, fmt),  # this process decides mismatches
        )
        yield here, SwarmBlocks(client, connection.loop)
