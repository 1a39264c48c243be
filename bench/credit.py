"""What credit costs a daemon: receipts in, a leaderboard audited, summaries in the DHT.

1. Receipts in: `--receipts` receipts signed by `--clients` client peer keys, taken as
   `CreditService._take` does (parse, check the signature, store into a SQLite file):
   receipts per second, the check and store shares (each timed alone too), then the
   time to build their sum tree (`Ledger.build`) and the summary a daemon publishes.
2. Auditing a board of `--servers` servers: `--ledgers` simulated servers of
   `--ledger-receipts` receipts each (the simulated board's servers take them in turn:
   signing a tree per server would take hours; sharing changes no per-server work).
   Each audit is the auditor's CPU work in `CreditService.audit_round` minus the
   network: its signed DHT record read (as hivemind's get and `read_on_node` do),
   `first_look` (checks the shown receipts' signatures), fresh draws, `check_proven` on
   the server's answer (a signature per draw). The server's side (answering the draws)
   and the board's SQLite file are timed apart. Target: the board audited as the issue
   defines it (each summary and the receipt it shows: signature, the client's standing)
   under 1 s; the proofs and the reads are reported beside it.
3. DHT bytes per daemon per hour: the summary record as msgpack, the summary alone and
   as stored (owner subkey and signature added), times publishes per hour, idle (every
   `PUBLISH_S`) and busy (every `MIN_PUBLISH_S`), and times hivemind's replicas; and
   what a daemon reads auditing `--swarm` servers (all summaries each audit round, while
   summaries change and while none does).

Prints the figures, then one JSON line.

    python bench/credit.py [--receipts 2000] [--servers 10000] [--swarm 100]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PARAMS_PER_BLOCK = 4_000_000
"""About a SmolLM2-135M block: receipts earn a few credits each, under the daily cap."""
DAY_S = 86_400.0
SPREAD_DAYS = 30
"""Receipts are closed over the last month (the recent credit decays)."""
DHT_REPLICAS = 5
"""hivemind's `DHTNode` default `num_replicas`: each store goes to that many peers."""
TARGET_AUDIT_S = 1.0
PUBLIC_NAME = "a volunteer in Lyon"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receipts", type=int, default=2000, help="receipts taken in (2000)")
    parser.add_argument("--clients", type=int, default=8, help="client keys signing them (8)")
    parser.add_argument("--servers", type=int, default=10_000, help="servers audited (10000)")
    parser.add_argument("--ledgers", type=int, default=8, help="distinct simulated servers (8)")
    parser.add_argument("--ledger-receipts", type=int, default=500, help="receipts of each (500)")
    parser.add_argument("--swarm", type=int, default=100, help="summaries a daemon reads (100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    args = parser.parse_args()
    if min(args.receipts, args.clients, args.servers, args.ledgers, args.ledger_receipts) < 1:
        parser.error("every count must be at least 1")
    return args


def main() -> None:
    args = _parse()
    import volunteer.trust.credit_summary  # noqa: F401  (hivemind's DHT: before any timing)

    rng = random.Random(args.seed)
    now_s = time.time()
    figures: dict[str, Any] = {}
    began = time.perf_counter()
    keys = [_key() for _ in range(args.clients + args.ledgers)]
    clients, servers = keys[: args.clients], keys[args.clients :]
    with tempfile.TemporaryDirectory(prefix="credit-bench-") as tmp:
        raws = _sign_receipts(clients, servers[0][1].peer_id, args.receipts, rng, now_s)
        figures["setup_s"] = round(time.perf_counter() - began, 1)
        summary = _intake(figures, raws, servers[0][1].peer_id, Path(tmp), now_s)
        _audit_board(figures, args, clients, servers, rng, now_s, Path(tmp))
    _dht_bytes(figures, summary, servers[0][0], args.swarm)
    _report(figures, args)


def _key() -> tuple[Any, Any]:
    """A fresh RSA peer key and its signer."""
    from hivemind.utils.crypto import RSAPrivateKey

    from volunteer.transport.commitment import PeerSigner

    key = RSAPrivateKey()
    return key, PeerSigner(key)


def _sign_receipts(
    clients: list[tuple[Any, Any]], server: str, count: int, rng: random.Random, now_s: float
) -> list[bytes]:
    """`count` receipts for work `server` did, signed by the clients in turn, as sent."""
    from volunteer.trust.receipts import Receipt, sign_receipt

    raws = []
    for n in range(count):
        _, signer = clients[n % len(clients)]
        closed_s = now_s - rng.uniform(0, SPREAD_DAYS * DAY_S)
        tokens = rng.randint(16, 2048)
        start = rng.randrange(0, 16)
        checked = rng.choice((0, 1, 2, 4))
        receipt = Receipt(
            model=MODEL,
            server=server,
            client=signer.peer_id,
            session_id=f"{rng.getrandbits(128):032x}",
            kind=rng.choice(("inference", "inference", "forward", "backward")),
            start=start,
            end=start + rng.randint(1, 15),
            tokens=tokens,
            opened_s=closed_s - tokens * 0.05,
            closed_s=closed_s,
            checked=checked,
            failed=1 if checked and rng.random() < 0.02 else 0,
        )
        raws.append(sign_receipt(signer, receipt).to_bytes())
    return raws


def _intake(
    figures: dict[str, Any], raws: list[bytes], server: str, tmp: Path, now_s: float
) -> Any:
    """Part 1; the daemon's summary of the receipts it took."""
    from volunteer.server.work_log import WorkLog
    from volunteer.trust.intake import take_receipt
    from volunteer.trust.ledger import Ledger
    from volunteer.trust.receipts import SignedReceipt, forget_checked_receipts

    def ledger(name: str) -> Ledger:
        return Ledger(tmp / name, server=server, model=MODEL, params_per_block=PARAMS_PER_BLOCK)

    forget_checked_receipts()
    began = time.perf_counter()
    checked = [(signed, signed.check()) for signed in map(SignedReceipt.from_bytes, raws)]
    check_s = time.perf_counter() - began

    stored = ledger("store-only.sqlite")
    began = time.perf_counter()
    for signed, receipt in checked:
        stored.add(signed, receipt, served=receipt.tokens)
    store_s = time.perf_counter() - began
    stored.close()

    # The daemon's own path (`CreditService._take`): each receipt against the work the
    # server logged for its client, none of them checked before.
    log = WorkLog(max_entries=len(raws) + 1)
    for _, receipt in checked:
        session = receipt.session_id if receipt.kind == "inference" else ""  # calls: a tally
        log.add(receipt.client, receipt.kind, session, receipt.tokens)
    clients = [receipt.client for _, receipt in checked]
    forget_checked_receipts()
    taken = ledger("receipts.sqlite")
    began = time.perf_counter()
    for raw, client in zip(raws, clients, strict=True):
        refused = take_receipt(taken, log.claim, peer=client, body=raw)
        if refused:
            raise AssertionError(f"an honest receipt was refused: {refused}")
    intake_s = time.perf_counter() - began
    if len(taken) != len(raws):
        raise AssertionError(f"kept {len(taken)} of {len(raws)} receipts")

    began = time.perf_counter()
    built = taken.build(now_s, is_banned=lambda peer: False)
    build_s = time.perf_counter() - began
    began = time.perf_counter()
    summary = _summary(taken, built)
    summary_s = time.perf_counter() - began
    taken.close()
    figures.update(
        receipts=len(raws),
        receipts_per_s=round(len(raws) / intake_s),
        intake_us=round(intake_s / len(raws) * 1e6, 1),
        check_us=round(check_s / len(raws) * 1e6, 1),
        store_us=round(store_s / len(raws) * 1e6, 1),
        check_share=round(check_s / (check_s + store_s), 3),
        store_share=round(store_s / (check_s + store_s), 3),
        build_ms=round(build_s * 1e3, 1),
        summary_ms=round(summary_s * 1e3, 1),
    )
    return summary


def _summary(ledger: Any, built: Any) -> Any:
    """The summary `CreditService.summary` publishes for `ledger` (blocks 0:15)."""
    from volunteer.trust.credit_summary import summary_of

    return summary_of(ledger, built, public_name=PUBLIC_NAME, blocks=(0, 15), online_since_s=0.0)


def _prove(ledger: Any, built: Any, body: bytes) -> bytes:
    """The server's answer to an auditor's draws, as `CreditService._prove`."""
    from volunteer.trust.credit_exchange import pack_proofs, unpack_draws
    from volunteer.trust.ledger import proof_at

    _, weights, points = unpack_draws(body)
    proven = []
    for point in points:
        leaf, path = proof_at(built, weights, point)
        signed = ledger.signed(leaf.receipt_id.hex())
        proven.append((leaf, path, signed.to_bytes()))
    return pack_proofs(proven)


def _audit_board(
    figures: dict[str, Any],
    args: argparse.Namespace,
    clients: list[tuple[Any, Any]],
    servers: list[tuple[Any, Any]],
    rng: random.Random,
    now_s: float,
    tmp: Path,
) -> None:
    """Part 2."""
    from hivemind.utils.serializer import MSGPackSerializer

    from volunteer.daemon.credit_board import board_rows
    from volunteer.daemon.credit_service import AUDIT_S, audit_period_s
    from volunteer.swarm.dht_records import make_validator, peer_id_from_owner
    from volunteer.trust.board import Board
    from volunteer.trust.credit_audit import check_proven, draw_points, draw_weights, first_look
    from volunteer.trust.credit_exchange import pack_draws, unpack_proofs
    from volunteer.trust.credit_summary import SAMPLE_SIZE, Summary
    from volunteer.trust.ledger import Ledger
    from volunteer.trust.receipts import SignedReceipt, forget_checked_receipts
    from volunteer.trust.reputation import Reputation

    began = time.perf_counter()
    simulated = []  # (peer id, ledger, built, signed DHT record)
    for identity, signer in servers:
        ledger = Ledger(None, server=signer.peer_id, model=MODEL, params_per_block=PARAMS_PER_BLOCK)
        for raw in _sign_receipts(clients, signer.peer_id, args.ledger_receipts, rng, now_s):
            signed = SignedReceipt.from_bytes(raw)
            ledger.add(signed, signed.check(), served=0)
        built = ledger.build(now_s, is_banned=lambda peer: False)
        record = _dht_record(identity, _summary(ledger, built))
        simulated.append((signer.peer_id, ledger, built, record))
    figures["board_setup_s"] = round(time.perf_counter() - began, 1)

    standing = Reputation()  # the auditor's own record of its peers (clients' standing)
    read_s = look_s = draw_s = proven_s = prove_s = 0.0
    draws_total = failures = 0
    summaries = []
    reader = make_validator(None)
    for n in range(args.servers):
        peer, ledger, built, record = simulated[n % len(simulated)]
        # Each server of a real board shows its own receipts: none is checked already.
        forget_checked_receipts()
        t0 = time.perf_counter()  # as hivemind's get, then `read_on_node`, read a record
        if not reader.validate(record):
            raise AssertionError("a summary's DHT record does not hold")
        value = MSGPackSerializer.loads(reader.strip_value(record))
        if peer_id_from_owner(MSGPackSerializer.loads(record.subkey)) != peer:
            raise AssertionError("a summary under another peer's subkey")
        summary = Summary.model_validate(value)
        t1 = time.perf_counter()
        problem = first_look(peer, summary, model=MODEL, now_s=now_s, is_banned=standing.is_banned)
        t2 = time.perf_counter()
        draws = draw_points(summary, rng)
        body = pack_draws(summary.root, draw_weights(summary.sums), draws)
        t3 = time.perf_counter()
        answer = _prove(ledger, built, body)  # the server's side
        t4 = time.perf_counter()
        problem = problem or check_proven(
            peer,
            summary,
            draws,
            unpack_proofs(answer),
            params_per_block=PARAMS_PER_BLOCK,
            is_banned=standing.is_banned,
        )
        t5 = time.perf_counter()
        read_s, look_s, draw_s = read_s + t1 - t0, look_s + t2 - t1, draw_s + t3 - t2
        prove_s, proven_s = prove_s + t4 - t3, proven_s + t5 - t4
        draws_total += len(draws)
        failures += problem is not None
        summaries.append(summary)
    if failures:
        raise AssertionError(f"{failures} honest summaries failed their audit")
    # The audit: each summary and the receipt it shows (signature, the client's
    # standing). Ours also draws a proof per summary, and reading the records (hivemind
    # checks each one's signature) comes first: both timed, and reported, apart.
    audit_s = look_s
    proofs_s = look_s + draw_s + proven_s
    whole_s = read_s + proofs_s

    board = Board(tmp / "board.sqlite")  # the daemon's board file, as `audit_round` fills it
    names = [f"{n:06d}-{simulated[n % len(simulated)][0]}" for n in range(args.servers)]
    began = time.perf_counter()
    board.look(set(names))
    for name, summary in zip(names, summaries, strict=True):
        board.audited(name, summary, now_s)
    board_s = time.perf_counter() - began
    began = time.perf_counter()
    rows = board_rows(board, Reputation(), own=names[0], now_s=now_s)
    rank_s = time.perf_counter() - began
    board.close()
    if len(rows) != args.servers:
        raise AssertionError(f"{len(rows)} of {args.servers} servers on the board")

    verify_us = _verify_us(summaries[0].sample[0])
    per_server = 1 + SAMPLE_SIZE + draws_total / args.servers  # the record, shown, drawn
    figures.update(
        servers=args.servers,
        ledgers=len(simulated),
        ledger_receipts=args.ledger_receipts,
        audit_s=round(audit_s, 3),
        audit_us_per_server=round(audit_s / args.servers * 1e6, 1),
        audit_with_proofs_s=round(proofs_s, 3),
        read_and_audit_with_proofs_s=round(whole_s, 3),
        read_us=round(read_s / args.servers * 1e6, 1),
        read_core_share=round(read_s / audit_period_s(AUDIT_S, args.servers, 0), 3),
        first_look_us=round(look_s / args.servers * 1e6, 1),
        draw_us=round(draw_s / args.servers * 1e6, 1),
        check_proven_us=round(proven_s / args.servers * 1e6, 1),
        draws_per_server=round(draws_total / args.servers, 2),
        prove_us=round(prove_s / args.servers * 1e6, 1),
        board_store_s=round(board_s, 3),
        audit_with_board_s=round(whole_s + board_s, 3),
        rank_ms=round(rank_s * 1e3, 1),
        rsa_verify_us=round(verify_us, 1),
        verifies_per_server=round(per_server, 2),
        verify_floor_s=round(args.servers * per_server * verify_us / 1e6, 3),
        target_s=TARGET_AUDIT_S,
        target_met=audit_s < TARGET_AUDIT_S,
    )


def _verify_us(raw: bytes, repeats: int = 2000) -> float:
    """One RSA verify of the receipt `raw`, its key loaded (us)."""
    from cryptography.hazmat.primitives import serialization
    from hivemind.utils.crypto import RSAPublicKey

    from volunteer.trust.receipts import SignedReceipt

    signed = SignedReceipt.from_bytes(raw)
    public = RSAPublicKey(serialization.load_der_public_key(signed.client_key))
    began = time.perf_counter()
    for _ in range(repeats):
        if not public.verify(signed.body, signed.signature):
            raise AssertionError("a receipt's signature does not hold")
    return (time.perf_counter() - began) / repeats * 1e6


def _dht_record(identity: Any, summary: Any) -> Any:
    """`summary` as `publish_on_node` stores it: under the owner's subkey, signed."""
    import dataclasses

    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import get_dht_time
    from hivemind.utils.serializer import MSGPackSerializer

    from volunteer.swarm.dht_records import make_validator, owner_marker, peer_id_from_owner
    from volunteer.trust.credit_summary import SUMMARY_TTL_S, credit_key

    owner = owner_marker(identity)
    record = DHTRecord(
        key=DHTID.generate(source=credit_key(MODEL, peer_id_from_owner(owner))).to_bytes(),
        subkey=MSGPackSerializer.dumps(owner_marker(identity)),
        value=MSGPackSerializer.dumps(summary.model_dump()),
        expiration_time=get_dht_time() + SUMMARY_TTL_S,
    )
    return dataclasses.replace(record, value=make_validator(identity).sign_value(record))


def _dht_bytes(figures: dict[str, Any], summary: Any, identity: Any, swarm: int) -> None:
    """Part 3, for the summary of part 1's daemon."""
    import msgpack

    from volunteer.daemon.credit_service import (
        AUDIT_S,
        MIN_PUBLISH_S,
        PUBLISH_S,
        QUIET_DOUBLINGS,
        audit_period_s,
    )
    from volunteer.swarm.dht_validator import MAX_RECORD_BYTES

    counted = len(msgpack.packb(summary.model_dump()))  # as msgpack, the summary alone
    record = _dht_record(identity, summary)
    value = record.value
    stored = len(record.key) + len(record.subkey) + len(value) + 8  # + the expiration
    idle_per_h, busy_per_h = 3600 / PUBLISH_S, 3600 / MIN_PUBLISH_S
    # Busy: a summary changes every round; quiet: none does (rounds come further apart).
    reads_per_h = 3600 / audit_period_s(AUDIT_S, swarm, 0)
    quiet_reads_per_h = 3600 / audit_period_s(AUDIT_S, swarm, QUIET_DOUBLINGS)
    entry = len(record.subkey) + len(value) + 8  # one server's entry in a read
    figures.update(
        record_bytes=counted,
        stored_record_bytes=stored,
        signed_value_bytes=len(value),
        max_record_bytes=MAX_RECORD_BYTES,
        fits_record=len(value) <= MAX_RECORD_BYTES,
        publishes_per_h_idle=idle_per_h,
        publishes_per_h_busy=busy_per_h,
        published_bytes_per_h_idle=round(idle_per_h * counted),
        published_bytes_per_h_busy=round(busy_per_h * counted),
        sent_bytes_per_h_idle=round(idle_per_h * stored * DHT_REPLICAS),
        sent_bytes_per_h_busy=round(busy_per_h * stored * DHT_REPLICAS),
        swarm=swarm,
        reads_per_h=reads_per_h,
        read_bytes_per_h=round(reads_per_h * swarm * entry),
        quiet_reads_per_h=quiet_reads_per_h,
        quiet_read_bytes_per_h=round(quiet_reads_per_h * swarm * entry),
        read_bytes_per_h_per_server=round(reads_per_h * entry),
    )


def _report(figures: dict[str, Any], args: argparse.Namespace) -> None:
    f = figures
    print(f"setup (keys, {f['receipts']} receipts signed): {f['setup_s']} s")
    print(f"\n1. receipts in ({f['receipts']} receipts, {args.clients} clients, SQLite file)")
    print(f"   checked and stored: {f['receipts_per_s']:,} receipts/s ({f['intake_us']} us each)")
    print(
        f"   check alone {f['check_us']} us ({f['check_share']:.0%}), "
        f"store alone {f['store_us']} us ({f['store_share']:.0%})"
    )
    print(f"   count and build the tree: {f['build_ms']} ms; the summary: {f['summary_ms']} ms")
    print(
        f"\n2. auditing {f['servers']:,} servers ({f['ledgers']} simulated ledgers of "
        f"{f['ledger_receipts']} receipts; setup {f['board_setup_s']} s)"
    )
    met = "met" if f["target_met"] else "NOT met"
    print(
        f"   the board audited (each summary and the receipt it shows: signature, client's "
        f"standing): {f['audit_s']} s, {f['audit_us_per_server']} us per server "
        f"(target < {TARGET_AUDIT_S:g} s: {met})"
    )
    print(
        f"   with a proof drawn per summary: {f['audit_with_proofs_s']} s; with the records "
        f"read from the DHT first: {f['read_and_audit_with_proofs_s']} s"
    )
    print(
        f"   per server: read {f['read_us']} us, first_look {f['first_look_us']} us, "
        f"draws {f['draw_us']} us, check_proven {f['check_proven_us']} us "
        f"({f['draws_per_server']} draws)"
    )
    print(
        f"   RSA verify {f['rsa_verify_us']} us x {f['verifies_per_server']} per server: "
        f"{f['verify_floor_s']} s of the board is signature checks alone"
    )
    print(
        f"   reads recur every audit round: {f['read_core_share']:.1%} of a core; the "
        f"servers' side (answering draws): {f['prove_us']} us per audit"
    )
    print(
        f"   the board's SQLite file (one look, every audit stored): {f['board_store_s']} s"
        f" (with it: {f['audit_with_board_s']} s); ranking the board: {f['rank_ms']} ms"
    )
    print(
        f"\n3. DHT: a summary record is {f['record_bytes']} bytes as counted, "
        f"{f['stored_record_bytes']} stored (signed value {f['signed_value_bytes']} of "
        f"at most {f['max_record_bytes']})"
    )
    for mode in ("idle", "busy"):
        print(
            f"   {mode}: {f[f'publishes_per_h_{mode}']:g} publishes/h, "
            f"{f[f'published_bytes_per_h_{mode}'] / 1e3:,.1f} kB/h counted, "
            f"{f[f'sent_bytes_per_h_{mode}'] / 1e3:,.1f} kB/h sent to {DHT_REPLICAS} replicas"
        )
    print(
        f"   reading a swarm of {f['swarm']} every audit round: {f['read_bytes_per_h'] / 1e6:,.1f}"
        f" MB/h while summaries change ({f['reads_per_h']:g} rounds/h), "
        f"{f['quiet_read_bytes_per_h'] / 1e6:,.1f} MB/h while none does "
        f"({f['quiet_reads_per_h']:g}/h)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
