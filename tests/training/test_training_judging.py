"""How a daemon judges an accusation of a training peer (`daemon.training_judging`):
on its own copy of the model, from a folder, with the evidence alone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hivemind.utils.crypto import RSAPrivateKey
from volunteer.models.config import ModelConfig

from tests.training.swarm_helpers import (
    signed_last_stage_work,
    tiny_data,
    tiny_job,
    tiny_model,
    write_hf_folder,
)
from volunteer.daemon.training_judging import training_verdict
from volunteer.model_cache.served_model import ServedModel
from volunteer.training.job import Aggregation
from volunteer.transport.commitment import PeerSigner
from volunteer.trust.accusations import Accusation
from volunteer.trust.evidence import EvidenceError, EvidenceLimitError


def test_a_daemon_convicts_wrong_work_clears_honest_work_and_checks_the_names(
    tmp_path: Path,
) -> None:
    full, ends = tiny_model()
    folder = write_hf_folder(tmp_path / "tiny", full, ends)
    model = ServedModel(folder, ModelConfig.from_hf_folder(folder), "tiny-random")
    job = tiny_job(tiny_data(ends.config.vocab_size, rows=12, sequence=8),
                   aggregation=Aggregation(kind="mean"))  # fmt: skip
    signer = PeerSigner(RSAPrivateKey())
    honest = signed_last_stage_work(job, full, ends, signer).to_bytes()
    liar = signed_last_stage_work(job, full, ends, signer, scale=-1.0).to_bytes()
    accusation = Accusation(
        kind="training", accused=signer.peer_id, start=2, end=4, filed_s=time.time(),
        evidence="0" * 64,
    )  # fmt: skip

    def verdict(raw: bytes, **changes: object) -> bool:
        named = accusation.model_copy(update=changes)
        return training_verdict(raw, named, model, max_age_s=3600.0)

    assert verdict(liar) is True
    assert verdict(honest) is False  # the accuser's word was false
    with pytest.raises(EvidenceError, match="another peer or stage"):
        verdict(liar, accused=PeerSigner(RSAPrivateKey()).peer_id)
    with pytest.raises(EvidenceError, match="another peer or stage"):
        verdict(liar, start=0, end=2)
    other = ServedModel(folder, model.config, "another-model")
    with pytest.raises(EvidenceError, match="another model"):
        training_verdict(liar, accusation, other, max_age_s=3600.0)
    with pytest.raises(EvidenceLimitError, match="too old"):
        training_verdict(liar, accusation, model, max_age_s=-1.0)
    # Microbatches over the judge's bound (an accuser's way to exhaust its memory: a
    # training pass holds every block's activations) are not recomputed.
    with pytest.raises(EvidenceLimitError, match="over this peer's limits"):
        training_verdict(liar, accusation, model, max_age_s=3600.0, max_positions=15)
