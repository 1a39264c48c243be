"""The daemon's wiring: builds its identity and services and runs it in this process.

`volunteer start --foreground` (and the detached child that `volunteer start` spawns) call
`run_foreground` once the settings are built; the CLI module only parses and calls.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from volunteer.paths import Paths
from volunteer.settings import Settings, read_config

if TYPE_CHECKING:
    from volunteer.daemon.runner import Service


def run_foreground(
    settings: Settings,
    *,
    paths: Paths,
    env: Mapping[str, str],
    flags: Mapping[str, Any],
    log_to_stderr: bool,
) -> int:
    """Runs the daemon until it is stopped.

    Args:
        settings: built from `env`, `flags` and the config file.
        paths: this volunteer's folders.
        env: the environment the settings were built from; with `flags` it still wins
            over the config file when the daemon is asked to reload it.
        flags: the `volunteer start` flags, by setting name.
        log_to_stderr: log to stderr too (attached to a terminal).

    Returns:
        The process's exit code.
    """
    # The OpenMP and allocator policies must be set before torch loads; torch, hivemind
    # and the event loop load only here, so `status`, `stop` and --help stay fast.
    from volunteer.machine.cpu_sharing import sleep_idle_threads
    from volunteer.machine.memory_tuning import return_large_frees_to_the_os

    sleep_idle_threads()
    return_large_frees_to_the_os()
    raise_file_limit()
    import asyncio

    import torch

    from volunteer.machine.lean_imports import import_hivemind

    import_hivemind()
    from volunteer.daemon.runner import run_daemon

    # This thread (the event loop's) computes one-position decode steps at most. Torch
    # work of more threads runs on threads that set their own count (from --threads:
    # several daemons on one machine each take their share): one OpenMP team here too
    # would make libgomp let idle workers sleep at once, and prefills would slow down
    # (see volunteer.machine.cpu_sharing.in_passing_thread).
    torch.set_num_threads(1)
    services = _services(settings, paths)

    def reload() -> tuple[Settings, Settings]:
        # The environment and flags it started with still win over the file.
        return Settings.build(paths=paths, env=env, flags=flags), read_config(paths)

    try:
        return asyncio.run(
            run_daemon(settings, paths, services, log_to_stderr=log_to_stderr, reload=reload)
        )
    finally:
        # The DHT removes the key file once p2pd has read it; this covers every exit
        # before that (a failed start, a stop while starting).
        from volunteer.daemon.identity import runtime_identity_path

        runtime_identity_path(paths).unlink(missing_ok=True)


def raise_file_limit() -> None:
    """Raises this process's open-file soft limit to its hard limit.

    Every p2p stream a server serves is a socket of this process, and many distros start
    processes at a soft limit of 1024: the caps on sessions, calls and push streams bound
    what peers hold, but together with the DHT's connections they can pass that. Where
    the platform has no `resource` module (Windows), or the limit cannot be raised, the
    limit stays as it is.
    """
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # macOS reports an infinite hard limit but refuses a soft one above OPEN_MAX (10240).
    for target in (hard, 10240):
        if soft != resource.RLIM_INFINITY and (target == resource.RLIM_INFINITY or target > soft):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                return
            except (ValueError, OSError):
                continue


def _services(settings: Settings, paths: Paths) -> list[Service]:
    """The daemon's services in start order (stopped in reverse: the blocks announce
    OFFLINE while the DHT is still up, a fine-tuning job saves its checkpoint while the
    swarm client it trains through is still up), under this peer's identity."""
    from volunteer.api.service import ApiService
    from volunteer.chat.service import ChatService
    from volunteer.daemon.block_service import BlockService
    from volunteer.daemon.credit_service import CreditService
    from volunteer.daemon.dht_service import DHTService
    from volunteer.daemon.finetune_service import AdapterChats, FinetuneService, adapter_names
    from volunteer.daemon.identity import (
        load_or_create_identity,
        runtime_identity_path,
        write_private_file,
    )
    from volunteer.daemon.training_service import TrainingService
    from volunteer.daemon.trust_service import TrustService
    from volunteer.swarm.dht_records import make_validator, owner_marker
    from volunteer.transport.commitment import PeerSigner

    identity = load_or_create_identity(paths)
    if identity.warning:
        print(f"volunteer: warning: {identity.warning}", file=sys.stderr)
    identity_path = write_private_file(runtime_identity_path(paths), identity.p2p_identity_bytes())
    dht = DHTService(
        settings,
        identity_path=identity_path,
        record_validator=make_validator(identity.private_key),
        known_peers_path=paths.data_dir / "known_peers.json",
    )
    owner = owner_marker(identity.private_key)
    signer = PeerSigner(identity.private_key)
    blocks = BlockService(
        settings,
        paths,
        dht,
        owner=owner,
        announce_period_s=settings.announce_period_s,
        signer=signer,
    )
    trust = TrustService(paths, blocks, dht=dht, owner=owner, settings=settings)
    credit = CreditService(settings, paths, dht, blocks, trust, signer=signer, owner=owner)
    chat = ChatService(
        settings,
        paths,
        dht,
        blocks,
        trust,
        receipts=credit.receipt_sender,
        adapters=AdapterChats(paths),
    )
    finetune = FinetuneService(settings, paths, chat)
    adapters = functools.partial(adapter_names, paths, settings.model)
    api = ApiService(settings, paths, chat, blocks, adapters=adapters)
    training = TrainingService(
        settings, paths, dht, blocks, credit, owner=owner, signer=signer,
        accuse=trust.accuse_training, is_banned=lambda peer: trust.reputation.is_banned(peer),
    )  # fmt: skip
    return [dht, blocks, trust, credit, chat, finetune, api, training]
