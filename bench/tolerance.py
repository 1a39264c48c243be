"""How much honest computations of the same blocks differ, against the tolerances the
checks use (`volunteer.trust.tolerance`): the embedded SmolLM2's blocks 0:15 and 15:30 on
a real chat prompt, as a prefill on 1 thread (the reference), a prefill on 2 threads,
single steps on 1 and 2 threads, steps of 7 positions, and the same in bfloat16.

Prints one line per case (the largest relative distance over positions and its margin
under the tolerance: tolerance / distance), then one JSON line.

    python bench/tolerance.py
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from volunteer.models.checkpoint import load_ends, load_span
from volunteer.models.config import ModelConfig
from volunteer.models.model import BlockSpan
from volunteer.models.tokenizer import Tokenizer

from volunteer.model_cache.smollm2 import DEFAULT_MODEL
from volunteer.model_cache.store import ModelStore
from volunteer.paths import Paths
from volunteer.trust.tolerance import relative_distances, tolerance_for

PROMPT = "Tell me about the history of Paris, France, in some detail please."


def _run(span: BlockSpan, hidden: torch.Tensor, threads: int, chunk: int | None) -> torch.Tensor:
    torch.set_num_threads(threads)
    with torch.inference_mode():
        if chunk is None:
            return span(hidden)
        length = hidden.shape[1]
        cache = span.allocate_cache(batch_size=1, max_length=length)
        outputs = []
        for position in range(0, length, chunk):
            output = span(hidden[:, position : position + chunk], start_pos=position, cache=cache)
            cache.length = position + output.shape[1]
            outputs.append(output)
        return torch.cat(outputs, dim=1)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    folder = ModelStore(Paths.from_environ().models_dir).resolve(DEFAULT_MODEL)
    config = ModelConfig.from_hf_folder(folder)
    ids = Tokenizer.from_folder(folder).encode_chat([{"role": "user", "content": PROMPT}])
    ends = load_ends(folder, config).eval()
    with torch.inference_mode():
        embedded = ends.embed(torch.tensor([ids]))
    figures: dict[str, float] = {}
    inputs = embedded
    for start, end in ((0, 15), (15, 30)):
        spans = {
            dtype: load_span(folder, config, start, end, dtype=dtype).eval()
            for dtype in (torch.float32, torch.bfloat16)
        }
        reference = _run(spans[torch.float32], inputs, 1, None)
        cases: dict[str, tuple[torch.dtype, Callable[[], torch.Tensor]]] = {}
        for dtype, span in spans.items():
            name = str(dtype).removeprefix("torch.")
            fed = inputs.to(dtype)
            cases[f"{name} prefill, 2 threads"] = (dtype, lambda s=span, h=fed: _run(s, h, 2, None))
            cases[f"{name} steps, 1 thread"] = (dtype, lambda s=span, h=fed: _run(s, h, 1, 1))
            cases[f"{name} steps, 2 threads"] = (dtype, lambda s=span, h=fed: _run(s, h, 2, 1))
            cases[f"{name} steps of 7, 2 threads"] = (dtype, lambda s=span, h=fed: _run(s, h, 2, 7))
        for case, (dtype, compute) in cases.items():
            distance = float(relative_distances(compute(), reference).max())
            tolerance = tolerance_for(dtype, torch.float32)
            margin = tolerance / distance if distance else float("inf")
            print(f"blocks {start}:{end} {case:28s} {distance:9.2e}  margin {margin:8.1f}x")
            figures[f"{start}:{end} {case}"] = distance
        inputs = reference
    print(json.dumps({"positions": len(ids), "max_relative_distance": figures}))


if __name__ == "__main__":
    main()
