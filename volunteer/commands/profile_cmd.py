"""`volunteer profile [--json]`: the machine, measured, and the daemon's decision with why."""

from __future__ import annotations

import argparse
import json
from typing import Any

from volunteer.paths import Paths

BENCH_BUDGET_S = 3.0
SWARM_TIMEOUT_S = 30.0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="measure this machine and show what the daemon would do",
        description="Profile the CPU, RAM, disk and GPUs, run short benchmarks (cached per "
        "hardware), and show the blocks, placement and role the daemon would choose, "
        "with the reasons. Settings come from config.toml, VOLUNTEER_* and these flags.",
    )
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    parser.add_argument("--model", metavar="NAME", help="model to plan for (default: config)")
    parser.add_argument("--num-blocks", dest="num_blocks", metavar="N", help="as for start")
    parser.add_argument("--max-ram-gib", dest="max_ram_gib", metavar="GIB", help="as for start")
    parser.add_argument("--max-gpu-gib", dest="max_gpu_gib", metavar="GIB", help="as for start")
    parser.add_argument("--rerun", action="store_true", help="benchmark again, ignore the cache")
    parser.set_defaults(handler=run_profile)


def run_profile(args: argparse.Namespace, paths: Paths) -> int:
    import os

    from volunteer.commands.profile_report import decide, report_json, report_lines
    from volunteer.machine.calibration import disk_read_estimate
    from volunteer.machine.hardware import collect_hardware
    from volunteer.machine.microbench import load_or_run
    from volunteer.model_cache.served_model import open_model
    from volunteer.models.checkpoint import load_span
    from volunteer.settings import Settings

    names = ("model", "num_blocks", "max_ram_gib", "max_gpu_gib")
    flags = {name: getattr(args, name) for name in names}
    settings = Settings.build(paths=paths, env=os.environ, flags=flags)
    hardware = collect_hardware(paths.cache_dir)
    model = open_model(settings.model, paths.models_dir)
    # One block of the served model is enough to time it (speed is per block).
    block = load_span(model.folder, model.config, 0, 1)
    cache_file = paths.cache_dir / "profile" / "microbench.json"
    # Block speed depends on the model as well as the hardware.
    fingerprint = f"{hardware.fingerprint()}-{model.swarm_name}"
    if args.rerun:
        cache_file.unlink(missing_ok=True)
    bench = load_or_run(
        cache_file, fingerprint, cache_dir=paths.cache_dir, budget_s=BENCH_BUDGET_S, span=block
    )
    snapshot, source, rtts = _swarm(paths, model.swarm_name)
    decision = decide(
        hardware=hardware,
        bench=bench,
        settings=settings,
        config=model.config,
        model_name=model.swarm_name,
        snapshot=snapshot,
        swarm_source=source,
        disk_read=disk_read_estimate(paths.cache_dir, bench.disk_read_bytes_per_s),
    )
    if args.json:
        print(json.dumps(report_json(hardware, bench, decision, rtts), indent=2))
    else:
        print("\n".join(report_lines(hardware, bench, decision, rtts)))
    return 0


def _swarm(paths: Paths, model_name: str) -> tuple[Any, str, dict[str, float | None]]:
    """The swarm as the local daemon sees it (or None: an empty one), where that came
    from, and each serving peer's round trip from the daemon."""
    from volunteer.control.client import ControlClient
    from volunteer.control.endpoint import ControlError
    from volunteer.control.lifecycle import running_daemon
    from volunteer.control.messages import STATUS, SWARM, SwarmParams
    from volunteer.swarm.records import RecordError, SwarmSnapshot

    if running_daemon(paths) is None:
        return None, "no daemon runs here: planned as the first server of a new swarm", {}
    try:
        client = ControlClient(paths)
        own = client.call(STATUS, timeout_s=SWARM_TIMEOUT_S).peer_id
        swarm = client.call(SWARM, SwarmParams(is_ping=True), timeout_s=SWARM_TIMEOUT_S)
        # Planned as the daemon would plan a restart: its own records are not another
        # server's, and its round trip to itself is no peer's.
        snapshot = SwarmSnapshot.from_json(swarm.model_dump(mode="json")).without(own or "")
    except (ControlError, RecordError) as exc:
        why = f"the daemon could not describe its swarm ({exc}): planned as a new swarm"
        return None, why, {}
    if snapshot.model != model_name:
        why = f"the daemon serves {snapshot.model}, not {model_name}: planned as a new swarm"
        return None, why, {}
    # The daemon pings the servers that are not offline.
    others = [s for s in swarm.servers if s.state != "offline" and s.peer_id != own]
    rtts = {s.peer_id: s.rtt_s for s in others}
    servers = len(snapshot.server_spans())
    where = f"as the running daemon sees it ({servers} other server(s) serving)"
    return snapshot, where, rtts
