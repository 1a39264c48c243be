"""Fine-tuning speed: training tokens/s of each method, locally and through loopback servers.

For each method (`ptune`, `deep_ptune`, `lora`, `volunteer.finetune.params`), full
training steps (`causal_loss`, backward, AdamW step: `volunteer.finetune.trainer`'s
step) on the same batches: first with every block in one process (`LocalBlocks`), then
through swarms of 1, 2 and 3 servers splitting the blocks evenly (SmolLM2: 0:30;
0:15, 15:30; 0:10, 10:20, 20:30), through `SwarmBlocks`. The servers are real `python -m
volunteer` daemons on 127.0.0.1, each in a process of its own (started with
`bench/swarm_generate.py`'s daemon helpers, which this imports; the first server starts
each swarm, the others join it); each swarm is fresh. The fine-tuning issue's target:
through 2 servers, at least 0.8 of local.

Tokens/s counts real (non-pad) tokens of the measured steps over their time, after
`--warmup` steps (allocations, connections). The batches are windows of this repository's
README of `--seq-len / 2` to `--seq-len` tokens, right-padded into `--batch-size` rows
(`volunteer.finetune.data.batches`). The first measured loss of each swarm run must
equal the local one (same model, batches and seed), or the row says so. Each method
runs on a client of its own; a run whose step fails (a server's call failed and no other
server holds its blocks) is run once more on a new client, and the table marks it and
lists the failures.

The local reference runs in a child process per method with libgomp's default OpenMP
wait policy (its fastest setting alone), once before the swarms and once after; its
speed is taken over both (tokens over seconds), so that drift in this machine's speed
does not tilt the ratios.
The swarm client is this process, with idle OpenMP workers asleep, as `volunteer
finetune --swarm` runs (`volunteer.machine.cpu_sharing`), as are the daemons.

Peak RSS: the local child's own (`getrusage`); the swarm client's (this process and its
p2pd) and each server's (the daemon and its children, p2pd included) sampled every
`RSS_EVERY_S` during each method's steps, the highest kept.

`--model tiny` trains a random 6-block model with SmolLM2's tokenizer instead, written to
a temporary folder. `--quick` is that with small batches (2 rows of up to 32 tokens),
the local reference run once, every method in one child (whose RSS is then its peak so
far), and every swarm started at once (the others idle, or close, beside the one
measured): a smoke test of the whole bench in under a minute, not a figure.

Prints a table, then one JSON line with every figure (`ratio_<method>_<N>`: tokens/s
through N servers over local).

    python bench/finetune.py [--steps 3] [--batch-size 4] [--seq-len 64] [--model smollm2]
    python bench/finetune.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ("ptune", "deep_ptune", "lora")
SWARM_SIZES = (1, 2, 3)
TARGET_RATIO = 0.8
"""The fine-tuning issue's target for 2 servers (tokens/s over local)."""
RSS_EVERY_S = 0.25
MIB = 1024 * 1024
TINY = {
    "num_hidden_layers": 6,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
"""`--model tiny`: 6 blocks, so that 1, 2 and 3 servers split them evenly."""
TRIES_AGAIN = 1
"""Runs of a method through a swarm tried again after a failed step (on a new client)."""
LOSS_TOLERANCE = 1e-3
"""Relative: a swarm's first loss against the local one (float32 both)."""
_CLIENT_MARK = "FINETUNE_BENCH_CLIENT"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        choices=("smollm2", "tiny"),
        default="smollm2",
        help="the real SmolLM2-135M (smollm2) or a random 6-block model (tiny)",
    )
    parser.add_argument("--steps", type=int, default=None, help="measured steps (3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (1)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (4; quick: 2)")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="longest row, in tokens (64; quick: 32)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument(
        "--servers", default=",".join(map(str, SWARM_SIZES)), help="swarm sizes (1,2,3)"
    )
    parser.add_argument("--prompt-len", type=int, default=16, help="P of the prompts (16)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (8)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads here (0: default)")
    parser.add_argument(
        "--server-threads", type=int, default=2, help="torch threads of each daemon (2)"
    )
    parser.add_argument(
        "--local-links",
        choices=("yes", "no"),
        default="yes",
        help="daemons serve this machine's processes on Unix sockets (yes; no: all via p2p)",
    )
    parser.add_argument(
        "--verify",
        choices=("off", "sample", "all"),
        default="off",
        help="the client's checks of the servers' calls (off; `volunteer finetune --swarm` "
        "uses sample, which recomputes most of a newcomer's calls here)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny random model, small batches, local run once: a smoke test (< 1 min)",
    )
    parser.add_argument("--local-part", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.model = "tiny"
    defaults = (3, 2, 32) if args.quick else (3, 4, 64)
    for name, default in zip(("steps", "batch_size", "seq_len"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.methods = [name for name in args.methods.split(",") if name]
    if set(args.methods) - set(METHODS) or not args.methods:
        parser.error(f"--methods must be among {', '.join(METHODS)}")
    try:
        args.servers = sorted({int(n) for n in args.servers.split(",") if n})
    except ValueError:
        parser.error("--servers takes whole numbers, e.g. 1,2,3")
    if not args.servers or min(args.servers) < 1:
        parser.error("--servers takes swarm sizes of at least 1")
    if min(args.steps, args.batch_size) < 1 or args.warmup < 0 or args.seq_len < 4:
        parser.error("--steps and --batch-size must be at least 1, --seq-len at least 4")
    return args


_BEGAN = time.perf_counter()


def _log(message: str) -> None:
    elapsed = time.perf_counter() - _BEGAN
    print(f"[finetune {elapsed:6.1f} s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the model and the data


def _model_folder(args: argparse.Namespace, tmp: Path) -> Path:
    """The model's Hugging Face folder: SmolLM2 from the model cache, or a tiny random
    model (SmolLM2's config shrunk, its tokenizer) written under `tmp`."""
    from volunteer.model_cache.smollm2 import DEFAULT_MODEL
    from volunteer.model_cache.store import ModelStore
    from volunteer.paths import Paths

    smollm2 = ModelStore(Paths.from_environ().models_dir).resolve(DEFAULT_MODEL)
    if args.model == "smollm2":
        return smollm2
    return _write_tiny(smollm2, tmp / "tiny-finetune-bench")


def _write_tiny(smollm2: Path, folder: Path) -> Path:
    import shutil

    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    config = {**json.loads((smollm2 / "config.json").read_text()), **TINY}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, folder / name)
    hidden, inner, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]
    generator = torch.Generator().manual_seed(0)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) / cols**0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(hidden, generator=generator)

    tensors = {"model.embed_tokens.weight": weight(vocab, hidden), "model.norm.weight": norm()}
    shapes = {
        "self_attn.q_proj": (q_out, hidden),
        "self_attn.k_proj": (kv_out, hidden),
        "self_attn.v_proj": (kv_out, hidden),
        "self_attn.o_proj": (hidden, q_out),
        "mlp.gate_proj": (inner, hidden),
        "mlp.up_proj": (inner, hidden),
        "mlp.down_proj": (hidden, inner),
    }
    for index in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{index}."
        tensors[prefix + "input_layernorm.weight"] = norm()
        tensors[prefix + "post_attention_layernorm.weight"] = norm()
        for name, shape in shapes.items():
            tensors[f"{prefix}{name}.weight"] = weight(*shape)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def _batches(folder: Path, args: argparse.Namespace) -> list[Any]:
    """The steps' batches, warm-up first: windows of the README, `--seq-len / 2` to
    `--seq-len` tokens each (every token a target but the first), right-padded."""
    from volunteer.models.tokenizer import Tokenizer

    from volunteer.finetune.data import Example, batches

    tokenizer = Tokenizer.from_folder(folder)
    ids = tokenizer.encode((ROOT / "README.md").read_text())
    rng = random.Random(0)
    count = (args.warmup + args.steps) * args.batch_size
    examples = []
    for line in range(count):
        length = rng.randint(max(2, args.seq_len // 2), args.seq_len)
        start = rng.randrange(0, max(1, len(ids) - length))
        window = tuple(ids[start : start + length])
        examples.append(Example(window, (False,) + (True,) * (len(window) - 1), line + 1))
    pad_id = tokenizer.eos_token_id or 0
    return list(batches(examples, args.batch_size, pad_id=pad_id, seed=0, epoch=0))


def _method(args: argparse.Namespace, name: str) -> Any:
    from volunteer.finetune.params import MethodSettings

    return MethodSettings(name, prompt_len=args.prompt_len, rank=args.rank, alpha=2.0 * args.rank)


def _train(ends: Any, config: Any, blocks: Any, method: Any, batches: list[Any], warmup: int):
    """Full training steps over `batches`: (real tokens, seconds, losses) of those after
    the first `warmup`."""
    import torch

    from volunteer.finetune.blocks import causal_loss
    from volunteer.finetune.params import AdapterParams
    from volunteer.finetune.trainer import DEFAULT_LR

    embed_std = float(ends.embed_tokens.weight.std())
    params = AdapterParams(method, config, embed_std=embed_std, seed=0)
    optimizer = torch.optim.AdamW(params.parameters(), lr=DEFAULT_LR[method.method], weight_decay=0)
    tokens, seconds, losses = 0, 0.0, []
    for step, batch in enumerate(batches):
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        adapter = params.span_adapter()
        loss, _ = causal_loss(ends, params.prompt, adapter, blocks, batch.input_ids, batch.targets)
        loss.backward()
        optimizer.step()
        took = time.perf_counter() - began
        if step >= warmup:
            tokens += batch.tokens
            seconds += took
            losses.append(float(loss.detach()))
    return tokens, seconds, losses


# ---------------------------------------------------------------- local reference (a child)


def _local_part(args: argparse.Namespace) -> None:
    """`--local-part`: the methods in turn, every block in this process; prints the runs
    as JSON, each with the process's peak RSS so far."""
    from volunteer.models.checkpoint import load_ends, load_span
    from volunteer.models.config import ModelConfig

    from volunteer.finetune.blocks import LocalBlocks

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = ModelConfig.from_hf_folder(args.folder)
    ends = load_ends(args.folder, config).eval().requires_grad_(False)
    blocks = LocalBlocks(load_span(args.folder, config, 0, config.num_layers).eval())
    batches = _batches(args.folder, args)
    runs = {}
    for method in args.methods:
        tokens, seconds, losses = _train(
            ends, config, blocks, _method(args, method), batches, args.warmup
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        runs[method] = {"tokens": tokens, "seconds": seconds, "losses": losses, "rss": peak}
    print(json.dumps(runs))


def _local_in_child(args: argparse.Namespace, folder: Path, methods: list[str]) -> dict[str, Any]:
    """`methods` run locally in a child process: {method: run}."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.pop(_CLIENT_MARK, None)
    command = [sys.executable, __file__, "--local-part", "--folder", str(folder)]
    command += [
        "--methods",
        ",".join(methods),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    command += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    command += ["--prompt-len", str(args.prompt_len), "--rank", str(args.rank)]
    command += ["--threads", str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the local run of {', '.join(methods)} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


# ---------------------------------------------------------------- swarms


class PeakRss:
    """The highest RSS (bytes) of this process (with its children: p2pd) and of each
    server (daemon and children) while in the `with` block, sampled in a thread."""

    def __init__(self, daemons: Any, servers: list[str]) -> None:
        import psutil

        self.daemons = daemons
        self.servers = servers
        self.me = psutil.Process()
        self.client = 0
        self.peak = dict.fromkeys(servers, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            total = 0
            for each in [self.me, *self.me.children(recursive=True)]:
                with contextlib.suppress(Exception):  # a child gone meanwhile
                    total += each.memory_info().rss
            self.client = max(self.client, total)
            for name in self.servers:
                with contextlib.suppress(Exception):
                    self.peak[name] = max(self.peak[name], int(self.daemons.memory(name)[0] * MIB))
            if self._stop.wait(RSS_EVERY_S):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _spans(num_layers: int, count: int) -> list[str]:
    bounds = [round(index * num_layers / count) for index in range(count + 1)]
    return [f"{a}:{b}" for a, b in itertools.pairwise(bounds)]


class Swarm:
    """The daemons of one swarm of `count` servers, splitting the blocks evenly."""

    def __init__(self, setup: Any, args: argparse.Namespace, count: int, longest: int) -> None:
        self.count = count
        self.spans = _spans(setup.config.num_layers, count)
        self.servers = [f"server{index}" for index in range(count)]
        self.daemons = setup.daemons(f"finetune{count}")
        positions = args.batch_size * (longest + args.prompt_len)
        self.flags = ["--max-backward-tokens", str(max(512, positions))]
        self.closed = False

    def start(self) -> None:
        """The first server starts the swarm, the others join it at once (each start
        waits on its own daemon). No bootstrap daemon: one process less on these cores."""
        _log(f"swarm of {self.count} server(s): {', '.join(self.spans)}")
        self.daemons.start(self.servers[0], "--blocks", self.spans[0], *self.flags)
        joiners = list(zip(self.servers[1:], self.spans[1:], strict=True))
        with ThreadPoolExecutor(max_workers=max(1, len(joiners))) as pool:
            starts = [
                pool.submit(self.daemons.start, name, "--blocks", span, *self.flags)
                for name, span in joiners
            ]
            for started in starts:
                started.result()

    def close(self, failed: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if failed:
            _log_tails(self.daemons)  # their homes go with the temporary folder
        self.daemons.close()


def _start_swarms(swarms: list[Swarm], stack: contextlib.ExitStack) -> None:
    """Starts the swarms at once, each closed when `stack` closes (with its daemons' log
    tails shown if anything failed)."""
    for swarm in swarms:
        stack.push(lambda kind, *_, swarm=swarm: swarm.close(failed=kind is not None))
    with ThreadPoolExecutor(max_workers=len(swarms)) as pool:
        for started in [pool.submit(swarm.start) for swarm in swarms]:
            started.result()


class HopFailures(logging.Handler):
    """The hop failures the client's spread logs (`volunteer.client.spread`: a call that
    failed on a server and was tried elsewhere) while in the `with` block."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []
        self.spread = logging.getLogger("volunteer.client.spread")

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(record.getMessage())

    def __enter__(self) -> HopFailures:
        self.spread.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.spread.removeHandler(self)


def _bench_swarm(sg: Any, setup: Any, args: argparse.Namespace, swarm: Swarm, batches: list[Any]):
    """Every method through the (started) swarm: {method: run}.

    Each method (and each try) gets a client of its own, so that no method inherits
    another's record of failed servers. A run whose step fails (a server's call failed
    and no other server holds its blocks) is run again once on a new client; each
    failure is reported with the run, and a method that fails twice gets no figure.
    """
    from volunteer.finetune.blocks import SwarmBlocks

    daemons, servers = swarm.daemons, swarm.servers
    results: dict[str, dict[str, Any]] = {}
    with sg.SwarmConnection([daemons.join]) as connection:
        for method in args.methods:
            errors: list[str] = []
            for _ in range(1 + TRIES_AGAIN):
                client = connection.client(
                    model=setup.swarm_name,
                    num_blocks=setup.config.num_layers,
                    config=setup.config,
                    verify=args.verify,
                    local_blocks=_local_blocks(setup) if args.verify != "off" else None,
                )
                blocks = SwarmBlocks(client, connection.loop)
                run = {"tokens": 0, "seconds": 0.0, "losses": [], "errors": errors}
                failed = None
                with PeakRss(daemons, servers) as rss, HopFailures() as hops:
                    try:
                        run["tokens"], run["seconds"], run["losses"] = _train(
                            setup.ends,
                            setup.config,
                            blocks,
                            _method(args, method),
                            batches,
                            args.warmup,
                        )
                    except Exception as exc:  # a failed step: reported, then tried again
                        failed = f"step failed: {type(exc).__name__}: {exc}"
                errors += hops.seen + ([failed] if failed else [])
                run["client_rss"] = rss.client
                run["server_rss"] = [rss.peak[name] for name in servers]
                results[method] = run
                if not failed:
                    break
                _log(f"{swarm.count} server(s), {method}: {failed}")
            if run["seconds"]:
                tps = run["tokens"] / run["seconds"]
                _log(f"{swarm.count} server(s), {method}: {tps:.1f} tokens/s")
    for name in servers:
        if not daemons.status(name).get("tokens_served"):
            raise RuntimeError(f"{name} served nothing: the blocks did not run remotely")
    return results


def _log_tails(daemons: Any, lines: int = 20) -> None:
    for name in daemons.pids:
        log = daemons.root / name / "logs" / "daemon.log"
        with contextlib.suppress(OSError):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            _log(f"{name}'s log ends:\n" + "\n".join(tail))


def _local_blocks(setup: Any) -> Any:
    """Blocks this process may compute to check a server (`--verify`), as the CLI's."""
    from volunteer.models.checkpoint import load_span

    loaded: dict[tuple[int, int], Any] = {}

    def get(start: int, end: int) -> Any:
        if (start, end) not in loaded:
            loaded.clear()
            loaded[(start, end)] = load_span(setup.folder, setup.config, start, end).eval()
        return loaded[(start, end)]

    return get


# ---------------------------------------------------------------- the report


def _report(
    args: argparse.Namespace,
    setup: Any,
    local: dict[str, list[dict[str, Any]]],
    swarms: dict[int, tuple[dict[str, dict[str, Any]], list[str]]],
    load_start: float,
) -> None:
    figures: dict[str, Any] = {
        "model": args.model,
        "num_blocks": setup.config.num_layers,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "prompt_len": args.prompt_len,
        "rank": args.rank,
        "threads": args.threads or None,
        "server_threads": args.server_threads,
        "local_links": args.local_links,
        "verify": args.verify,
        "cpus": os.cpu_count(),
    }
    sizes = sorted(swarms)
    heads = "".join(f" {f'{n} server' + ('s' if n > 1 else ''):>17s} " for n in sizes)
    print(f"\ntraining tokens/s (ratio to local); real tokens, after {args.warmup} warm-up step(s)")
    print(f"{'method':11s} {'local':>9s}{heads}")
    for method in args.methods:
        runs = local[method]
        local_tps = sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs)
        figures[f"local_tps_{method}"] = round(local_tps, 2)
        figures[f"local_tps_{method}_runs"] = [round(r["tokens"] / r["seconds"], 2) for r in runs]
        line = f"{method:11s} {local_tps:9.1f}"
        for count in sizes:
            run = swarms[count][0][method]
            if run["errors"]:
                figures[f"errors_{method}_{count}"] = run["errors"]
            if not run["seconds"]:  # failed twice: no figure
                figures[f"swarm{count}_tps_{method}"] = figures[f"ratio_{method}_{count}"] = None
                line += f" {'failed':>17s}*"
                continue
            tps = run["tokens"] / run["seconds"]
            ratio = tps / local_tps
            same = _same_loss(run["losses"][0], runs[0]["losses"][0])
            figures[f"swarm{count}_tps_{method}"] = round(tps, 2)
            figures[f"ratio_{method}_{count}"] = round(ratio, 3)
            figures[f"same_loss_{method}_{count}"] = same
            mark = "!" if not same else "*" if run["errors"] else " "
            line += f" {tps:9.1f} ({ratio:5.3f}){mark}"
        print(line)
    if 2 in swarms:
        ratios = [figures[f"ratio_{m}_2"] for m in args.methods]
        worst = None if None in ratios else min(ratios)
        figures["target_met_2"] = worst is not None and worst >= TARGET_RATIO
        shown = "a run failed" if worst is None else f"worst ratio {worst:.3f}"
        print(
            f"target: through 2 servers >= {TARGET_RATIO} of local: {shown}, "
            f"{'met' if figures['target_met_2'] else 'NOT met'}"
        )
    if not all(v for k, v in figures.items() if k.startswith("same_loss_")):
        print(f"!: the first loss differs from the local one by more than {LOSS_TOLERANCE:g}")
    failures = [
        (key, error) for key, v in figures.items() if key.startswith("errors_") for error in v
    ]
    if failures:
        print("*: calls failed on a server during the run (a failed step: its run tried again")
        print("   on a new client; 'failed': both tries failed):")
        for key, error in failures:
            print(f"   {key.removeprefix('errors_')}: {error}")

    print("\npeak RSS, MiB (local: the child's own; swarm client: this process and its p2pd;")
    print("servers: each daemon and its children, p2pd included; the highest over methods)")
    print(f"{'method':11s} {'local':>7s} " + " ".join(f"{f'client@{n}':>9s}" for n in sizes))
    for method in args.methods:
        peak = max(r["rss"] for r in local[method])
        figures[f"local_rss_mib_{method}"] = round(peak / MIB, 1)
        line = f"{method:11s} {peak / MIB:7.1f} "
        for count in sizes:
            client = swarms[count][0][method]["client_rss"]
            figures[f"client_rss_mib_{method}_{count}"] = round(client / MIB, 1)
            line += f"{client / MIB:9.1f} "
        print(line)
    for count in sizes:
        results, spans = swarms[count]
        peaks = [max(run["server_rss"][i] for run in results.values()) for i in range(count)]
        figures[f"server_rss_mib_{count}"] = [round(p / MIB, 1) for p in peaks]
        figures[f"spans_{count}"] = spans
        shown = ", ".join(f"{span}: {p / MIB:.1f}" for span, p in zip(spans, peaks, strict=True))
        print(f"servers of the {count}-server swarm: {shown}")
    figures["load_avg_1m"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    print(
        f"\n{os.cpu_count()} CPUs: the servers, their p2pd and this client share them on "
        f"loopback (1-min load {figures['load_avg_1m'][0]} at start, "
        f"{figures['load_avg_1m'][1]} at end), so the ratios understate a real swarm, where "
        "each server computes on cores of its own; loopback also hides network latency "
        "and bandwidth, which a real swarm adds."
    )
    if args.model == "tiny":
        print("tiny random model: a smoke test of the bench, not a figure to quote")
    print(json.dumps(figures))


def _same_loss(swarm: float, local: float) -> bool:
    return abs(swarm - local) <= LOSS_TOLERANCE * max(1.0, abs(local))


def _run_local(
    args: argparse.Namespace, folder: Path, local: dict[str, list[dict[str, Any]]], label: str
) -> None:
    """The local reference: a child per method (its RSS its own), or in `--quick` one
    child for all (each method's RSS the child's peak so far)."""
    groups = [args.methods] if args.quick else [[method] for method in args.methods]
    for methods in groups:
        for method, run in _local_in_child(args, folder, methods).items():
            local[method].append(run)
            _log(f"{label}, {method}: {run['tokens'] / run['seconds']:.1f} tokens/s")


def _as_swarm_client() -> None:
    """Re-runs this script as a swarm client runs (`volunteer.machine.cpu_sharing`): idle
    OpenMP workers sleep. libgomp reads that when torch loads, hence the fresh process."""
    if os.environ.get(_CLIENT_MARK):
        return
    from volunteer.machine.cpu_sharing import sleeping_threads_env

    env = {**os.environ, **sleeping_threads_env(os.environ), _CLIENT_MARK: "1"}
    os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)


def main() -> None:
    args = _parse()
    if args.local_part:
        _local_part(args)
        return
    _as_swarm_client()
    import swarm_generate as sg  # torch, hivemind and the daemon helpers: only past --help
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        folder = _model_folder(args, Path(tmp))
        from volunteer.models.config import ModelConfig

        config = ModelConfig.from_hf_folder(folder)
        env = sg.daemon_env(sg.Paths.from_environ())
        setup = sg._setup(
            folder, config, [], env, Path(tmp), args.server_threads, args.local_links, 0
        )
        setup.ends.requires_grad_(False)
        batches = _batches(folder, args)
        tokens = sum(batch.tokens for batch in batches[args.warmup :])
        _log(
            f"{args.model}: {config.num_layers} blocks; {args.steps} steps of {args.batch_size}"
            f" rows up to {args.seq_len} tokens ({tokens} real tokens measured per method)"
        )
        local: dict[str, list[dict[str, Any]]] = {method: [] for method in args.methods}
        _run_local(args, folder, local, "local")
        longest = max(batch.input_ids.shape[1] for batch in batches)
        swarms = {}
        with contextlib.ExitStack() as every:
            if args.quick:  # a smoke test: every swarm started at once, each closed in the
                # background once measured, the others idling beside the one measured
                closer = every.enter_context(ThreadPoolExecutor(max_workers=len(args.servers)))
                quick = {n: Swarm(setup, args, n, longest) for n in args.servers}
                _start_swarms(list(quick.values()), every)
            for count in args.servers:
                with contextlib.ExitStack() as stack:
                    swarm = quick[count] if args.quick else Swarm(setup, args, count, longest)
                    if not args.quick:
                        _start_swarms([swarm], stack)
                    swarms[count] = (_bench_swarm(sg, setup, args, swarm, batches), swarm.spans)
                if args.quick:
                    closer.submit(swarm.close, False)
        if not args.quick:
            _run_local(args, folder, local, "local again")
    _report(args, setup, local, swarms, load_start)


if __name__ == "__main__":
    main()
