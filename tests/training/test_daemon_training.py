"""Collaborative training end to end: real daemons on 127.0.0.1 train a tiny random
Llama (a Hugging Face folder each loads by path) through `volunteer train`.

A driver daemon creates the job; five daemons join it, two in stage 0 and three in
stage 1, one of them Byzantine on purpose (`VOLUNTEER_FAULTS=sign-flip`); a sixth,
started with `--train`, takes the role by itself and is brought to the current step.
Every share is recomputed each round, so the attacker is banned in its first step with
two judges beside it, and a judge's evidence bans it swarm-wide; a stage-0 peer is
killed with SIGKILL mid-run, then the driver itself, for good: the backup driver the job
names (it fetched the job's data from the driver, shard by shard) drives it on from the
record the driver sent it, and the driver, started again, stands by for its backup.
The job still finishes every step, each step's loss exactly one process's training on
the same data, and the peers hold the drivers' signed receipts for the work the
stages kept.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from volunteer.models.checkpoint import load_span
from volunteer.models.config import ModelConfig

from tests.daemon.homes import DaemonSwarm, Homes, wait_for
from tests.training.swarm_helpers import (
    alone_trained,
    tiny_data,
    tiny_job,
    tiny_model,
    write_hf_folder,
)
from volunteer.control.endpoint import use_tcp
from volunteer.paths import Paths
from volunteer.training.job import Aggregation, Optimizer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(use_tcp(), reason="daemon tests use the Unix-socket path"),
]

STEPS = 40
BATCH = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("training")
    full, ends = tiny_model()
    model = write_hf_folder(root / "tiny-llama", full, ends)
    data = root / "data.npy"
    np.save(data, tiny_data(ends.config.vocab_size, rows=48, sequence=8).numpy())
    homes = Homes(root)
    swarm = DaemonSwarm(homes, model, new_tokens="1", chat_timeout_s=60,
                        daemon_flags=("--num-blocks", "0"))  # fmt: skip
    try:
        driver = swarm.start("driver")
        backup = swarm.start("backup")
        peers = {f"p{i}": swarm.start(f"p{i}") for i in range(1, 6)}
        created = homes.cli(
            driver, "train", "create", str(data), "--stages", "2", "--steps", str(STEPS),
            "--batch-size", str(BATCH), "--microbatch-size", "2", "--sequence-length", "8",
            "--checks", "3", "--no-rebalance", "--min-peers", "2", "--lr", "0.003",
            "--aggregation", "mean", "--backup", homes.status(backup)["peer_id"], "--shards", "3",
            "--json",
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        # A backup stands by only with the job's data, and only a named one does.
        other = root / "other.npy"
        np.save(other, tiny_data(ends.config.vocab_size, rows=40, sequence=8).numpy())
        refused = homes.cli(backup, "train", "standby", str(other))
        assert refused.returncode != 0 and "does not hold job" in refused.stderr
        refused = homes.cli(peers["p1"], "train", "standby")
        assert refused.returncode != 0 and "a backup driver" in refused.stderr
        standing = homes.cli(backup, "train", "standby")  # it fetches the data
        assert standing.returncode == 0, standing.stderr
        attacker = homes.home("p5")
        # The attacker restarts with the drill: its status says so.
        assert homes.cli(attacker, "stop").returncode == 0
        homes.env["VOLUNTEER_FAULTS"] = "sign-flip"
        swarm.start("p5")
        del homes.env["VOLUNTEER_FAULTS"]
        # This one takes the role itself: it serves no blocks, so training is its role.
        auto = swarm.start("auto", "--train", "--announce-period", "5")
        for name, stage in (("p1", 0), ("p2", 0), ("p5", 1), ("p3", 1), ("p4", 1)):
            joined = homes.cli(peers[name], "train", "join", "--stage", str(stage))
            assert joined.returncode == 0, joined.stderr
        wait_for("the auto peer's role", lambda: homes.status(auto)["training_role"] == "peer", 60)
        wait_for("two steps", lambda: homes.status(driver)["training_step"] >= 2, 120)
        victim = homes.remember(peers["p1"])
        os.killpg(victim, signal.SIGKILL)
        killed_at = homes.status(driver)["training_step"]
        # The driver dies for good: its backup drives on. Started again (through
        # another peer: it was the swarm's first), it stands by for its backup.
        wait_for("six steps", lambda: homes.status(driver)["training_step"] >= 6, 120)
        os.killpg(homes.remember(driver), signal.SIGKILL)
        died = time.monotonic()
        wait_for("the backup to drive", lambda: homes.status(backup)["training_role"] == "driver",
                 90)  # fmt: skip
        print(f"\nthe backup drove on {time.monotonic() - died:.1f} s after the driver died")
        swarm.join = swarm.started["p2"]["multiaddrs"][0]
        swarm.start("driver")
        wait_for(
            "the job to finish",
            lambda: homes.status(backup)["training_state"] in ("done", "failed"),
            240,
        )
        peers["auto"] = auto
        # The same training in one process: what every step's loss must be.
        rows = tiny_data(ends.config.vocab_size, rows=48, sequence=8)
        job = tiny_job(rows, aggregation=Aggregation(kind="mean"), batch=BATCH, steps=STEPS)
        job = job.model_copy(update={"optimizer": Optimizer(name="adamw", lr=0.003)})
        expected, weights = alone_trained(full, ends, job, rows)
        yield {
            "homes": homes, "driver": driver, "backup": backup, "peers": peers,
            "killed_at": killed_at,
            "expected": expected, "weights": weights, "data": data,
        }  # fmt: skip
    finally:
        homes.reap()


def test_the_job_finishes_every_step_with_the_loss_going_down(trained: dict) -> None:
    status = trained["homes"].status(trained["backup"])
    assert status["training_state"] == "done", status.get("training_error")
    assert trained["killed_at"] < STEPS - 1  # the kill came mid-run
    losses = [loss for _, loss in status["training_losses"]]
    assert [step for step, _ in status["training_losses"]] == list(range(STEPS))
    # Every third step sees the same batch again (48 rows, 16 a step).
    assert sum(losses[-3:]) < sum(losses[:3])
    # Through the attacker, the kill and the late joiner: no data lost or counted twice,
    # no wrong share aggregated. The loss is one process's, step for step.
    assert losses == pytest.approx(trained["expected"], rel=1e-5)


def test_the_trained_blocks_are_saved_as_a_model_folder(trained: dict) -> None:
    """The driver took the blocks from the stages' peers (a majority of each stage) and
    wrote them as a model folder a daemon or a chat can load: they are one process's."""
    result = trained["homes"].status(trained["backup"])["training_result"]
    assert result.startswith("model train-"), result
    folder = Path(result.split(" (", 1)[1].removesuffix(")"))
    assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    config = ModelConfig.from_hf_folder(folder)
    span = load_span(folder, config, 0, config.num_layers).requires_grad_(False)
    for name, tensor in span.named_parameters():
        expected = trained["weights"][name]
        assert float((tensor - expected).norm() / expected.norm()) < 1e-4, name


def test_the_driver_back_stood_by_for_its_backup_to_the_end(trained: dict) -> None:
    """The driver that came back found its backup driving: it stood by (taking its
    backup's records, so it could drive on in turn), did not drive a second time, and
    stood down when the job was done (told by the last record, or by the peers)."""
    homes, driver = trained["homes"], trained["driver"]
    wait_for("the job's end", lambda: homes.status(driver)["training_state"] == "done", 60)
    status = homes.status(driver)
    assert status["training_role"] == "standby" and status["training_step"] == STEPS
    # The losses its records showed (all of them, if it was back before the end).
    losses = homes.status(trained["backup"])["training_losses"]
    assert status["training_losses"] == losses[: len(status["training_losses"])]
    record = Paths.resolve(home=driver, env=homes.env).data_dir / "training" / "driving.json"
    assert not record.exists()  # done: nothing to drive on after a restart
    assert "role      standby (done)" in homes.cli(driver, "train", "status").stdout


def test_the_backup_fetched_the_data_shard_by_shard(trained: dict) -> None:
    homes, backup = trained["homes"], trained["backup"]
    job = homes.status(backup)["training_job"]
    fetched = Paths.resolve(home=backup, env=homes.env).data_dir / "training" / f"{job}.npy"
    assert np.array_equal(np.load(fetched), np.load(trained["data"]))


def test_the_byzantine_peer_is_banned_and_says_it_drills(trained: dict) -> None:
    homes = trained["homes"]
    attacker = homes.status(trained["peers"]["p5"])
    assert attacker["faults"] == "sign-flip"
    status = homes.status(trained["backup"])
    assert status["training_banned"] == [attacker["peer_id"]]  # the driver's bans went on
    text = homes.cli(trained["backup"], "train", "status").stdout
    assert "banned" in text and attacker["peer_id"] in text and f"{STEPS} of {STEPS}" in text


def _bans(homes: Homes, home: Path) -> dict[str, str]:
    """Whom a daemon bans, and why (`volunteer peers`)."""
    listed = homes.cli(home, "peers", "--json")
    assert listed.returncode == 0, listed.stderr
    return {
        peer["peer_id"]: peer["ban_reason"]
        for peer in json.loads(listed.stdout)["peers"]
        if peer["banned_until_s"]
    }


def test_the_attacker_is_banned_swarm_wide_on_a_validators_evidence(trained: dict) -> None:
    """A validator of stage 1 published the attacker's signed share as evidence; the
    driver, which validates nothing, recomputed it on its own copy of the model and
    banned the attacker for serving too. Nobody banned an honest peer."""
    homes = trained["homes"]
    attacker = homes.status(trained["peers"]["p5"])["peer_id"]
    driver = trained["driver"]
    wait_for("the driver to judge the evidence", lambda: attacker in _bans(homes, driver), 60)
    assert "training" in _bans(homes, driver)[attacker]
    assert "recomputed" in _bans(homes, driver)[attacker]
    filed = sum(
        homes.status(trained["peers"][name])["accusations_filed"] for name in ("p3", "p4", "auto")
    )
    assert filed >= 1
    for name in ("p2", "p3", "p4", "auto"):
        assert set(_bans(homes, trained["peers"][name])) <= {attacker}, name
    assert set(_bans(homes, driver)) == {attacker}


def test_honest_peers_took_the_drivers_receipts(trained: dict) -> None:
    homes = trained["homes"]
    for name in ("p2", "p3", "auto"):
        home = trained["peers"][name]
        status = homes.status(home)
        assert status["training_role"] == "peer" and status["training_step"] == STEPS, (
            name,
            status["peer_id"],
            status["training_step"],
            status["training_stage"],
        )
        wait_for(f"{name} to keep a receipt", lambda h=home: homes.status(h)["receipts_kept"] > 0)


def test_a_lora_job_leaves_its_adapter_with_the_driver(trained: dict) -> None:
    """Last, as it starts a new job on the same daemons: a LoRA job's driver takes the
    stages' adapters from their peers when it is done and stores them as one adapter
    under the name asked for."""
    homes, driver, peers = trained["homes"], trained["driver"], trained["peers"]
    backup = trained["backup"]
    for home in (driver, backup, peers["p2"], peers["p3"]):
        assert homes.cli(home, "train", "leave").returncode == 0
    # A driver that leaves a job tells its backup, which stands down (it is not driven
    # on), though it stood by after the driver's first record went out.
    created = homes.cli(driver, "train", "create", str(trained["data"]), "--sequence-length", "8",
                        "--backup", homes.status(backup)["peer_id"])  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert homes.cli(backup, "train", "standby", str(trained["data"])).returncode == 0
    assert homes.cli(driver, "train", "leave").returncode == 0
    wait_for("the backup to stand down", lambda: homes.status(backup)["training_state"] == "left")
    assert homes.status(backup)["training_role"] == "standby"
    taken = homes.cli(driver, "train", "create", str(trained["data"]), "--save-as", "bad/name",
                      "--lora-rank", "4", "--sequence-length", "8")  # fmt: skip
    assert taken.returncode != 0 and "invalid adapter name" in taken.stderr
    for backup, says in (("not-a-peer-id", "drivers"), (homes.status(driver)["peer_id"], "own")):
        taken = homes.cli(driver, "train", "create", str(trained["data"]), "--backup", backup,
                          "--sequence-length", "8")  # fmt: skip
        assert taken.returncode != 0 and says in taken.stderr, taken.stderr
    created = homes.cli(
        driver, "train", "create", str(trained["data"]), "--stages", "2", "--steps", "3",
        "--batch-size", "8", "--microbatch-size", "2", "--sequence-length", "8",
        "--lora-rank", "4", "--save-as", "swarm-lora", "--aggregation", "mean",
        "--no-rebalance", "--lr", "0.003",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    # Recorded from the start, so that a restart before the first step drives it on.
    record = Paths.resolve(home=driver, env=homes.env).data_dir / "training" / "driving.json"
    assert json.loads(record.read_text())["step"] == 0
    for name, stage in (("p2", 0), ("p3", 1)):
        joined = homes.cli(peers[name], "train", "join", "--stage", str(stage))
        assert joined.returncode == 0, joined.stderr
    wait_for(
        "the LoRA job to finish",
        lambda: homes.status(driver)["training_state"] in ("done", "failed"),
        120,
    )
    status = homes.status(driver)
    assert status["training_result"].startswith("adapter swarm-lora ("), status
    assert not record.exists()  # done: nothing to drive on after a restart
    assert "result    adapter swarm-lora" in homes.cli(driver, "train", "status").stdout
    shown = homes.cli(driver, "adapters", "show", "swarm-lora", "--json")
    assert shown.returncode == 0, shown.stderr
    adapter = json.loads(shown.stdout)
    assert (adapter["method"], adapter["rank"], adapter["steps"]) == ("lora", 4, 3)
    assert adapter["num_layers"] == 4 and adapter["train_loss"] == status["training_loss"]
    assert adapter["tensors"]["lora.qkv.a"]["shape"][:2] == [4, 4]
