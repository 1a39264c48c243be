"""A training swarm on loopback for tests: stage peers and a driver, each on its own
hivemind P2P daemon, training a tiny random-weight Llama; and the same model trained in
one process, the reference the swarm must match."""

from __future__ import annotations

import copy
import hashlib
import time

import torch
from volunteer.models.adapters import LORA_TARGETS
from volunteer.models.model import BlockSpan, ModelEnds

from tests.server import random_span, sub_span, tiny_config
from volunteer.training.claims import ClaimLog, ShareClaim, sign_claim, weights_digest
from volunteer.training.evidence import TrainingEvidence
from volunteer.training.job import Aggregation, DataShard, Optimizer, TrainingJob
from volunteer.training.loopback import LoopbackSwarm, start_loopback_swarm
from volunteer.training.stage import StageTrainer, sequence_losses, stage_lora
from volunteer.transport.commitment import PeerSigner, tensor_digest

OPTIMIZER = Optimizer(name="adamw", lr=3e-3, weight_decay=0.01)


def tiny_model(seed: int = 0) -> tuple[BlockSpan, ModelEnds]:
    config = tiny_config()
    full = random_span(config, seed)
    torch.manual_seed(seed + 1)
    return full, ModelEnds(config).eval().requires_grad_(False)


def tiny_data(vocab: int, rows: int, sequence: int, seed: int = 11) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, sequence + 1), generator=generator)


def tiny_job(
    data: torch.Tensor,
    *,
    aggregation: Aggregation,
    stages: tuple[tuple[int, int], ...] = ((0, 2), (2, 4)),
    batch: int = 12,
    micro: int = 2,
    steps: int = 6,
    lora_rank: int | None = None,
) -> TrainingJob:
    shard = DataShard(
        sha256=hashlib.sha256(data.numpy().tobytes()).hexdigest(), sequences=len(data)
    )
    return TrainingJob(
        model="tiny-random",
        num_blocks=stages[-1][1],
        trains="lora" if lora_rank else "blocks",
        lora_rank=lora_rank,
        stages=stages,
        shards=(shard,),
        sequence_length=data.shape[1] - 1,
        batch_size=batch,
        microbatch_size=micro,
        optimizer=OPTIMIZER,
        aggregation=aggregation,
        seed=7,
        steps=steps,
    )


def alone(full: BlockSpan, ends: ModelEnds, job: TrainingJob, data: torch.Tensor) -> list[float]:
    """The losses of training every block (or their LoRA adapters) in one process on
    the job's batches."""
    return alone_trained(full, ends, job, data)[0]


def alone_trained(
    full: BlockSpan, ends: ModelEnds, job: TrainingJob, data: torch.Tensor
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """`alone`'s losses and the tensors it trained, named as the stages name theirs:
    the span's names, or the adapter store's for a LoRA job's adapter."""
    span = copy.deepcopy(full).train()
    adapter = None
    if job.lora_rank:
        span.requires_grad_(False)
        adapter = stage_lora(span.config, job.lora_rank, range(span.num_blocks), seed=job.seed)
    trained = list(adapter.tensors if adapter is not None else span.parameters())
    optimizer = torch.optim.AdamW(
        trained, lr=job.optimizer.lr, weight_decay=job.optimizer.weight_decay
    )
    losses = []
    for step in range(job.steps):
        rows = data[(step * job.batch_size + torch.arange(job.batch_size)) % len(data)]
        hidden = span(ends.embed(rows[:, :-1]), adapter=adapter)
        loss = sequence_losses(ends, hidden, rows[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        span.forget_weights()
        losses.append(float(loss.detach()))
    if adapter is None:
        return losses, {name: param.detach() for name, param in span.named_parameters()}
    names = [f"lora.{target}.{part}" for target in LORA_TARGETS for part in "ab"]
    return losses, {name: tensor.detach() for name, tensor in zip(names, trained, strict=True)}


async def start_swarm(
    full: BlockSpan,
    ends: ModelEnds,
    job: TrainingJob,
    data: torch.Tensor,
    *,
    stages: list[int],
    **options: object,
) -> LoopbackSwarm:
    """A loopback swarm of `full`'s blocks (`volunteer.training.loopback`)."""
    return await start_loopback_swarm(
        job, data, span_for=lambda start, end: sub_span(full, start, end), ends=ends,
        stages=stages, **options,
    )  # fmt: skip


def write_hf_folder(folder, full: BlockSpan, ends: ModelEnds):  # type: ignore[no-untyped-def]
    """`full` and `ends` as a Hugging Face llama folder (config.json + safetensors): a
    model a daemon can load by path. Fused projections are split back into HF's."""
    import json

    from safetensors.torch import save_file

    config = full.config
    folder.mkdir(parents=True, exist_ok=True)
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    tensors = {
        "model.embed_tokens.weight": ends.embed_tokens.weight,
        "model.norm.weight": ends.norm.weight,
        "lm_head.weight": ends.lm_head.weight,
    }
    for index, block in enumerate(full.blocks):
        state = block.state_dict()
        prefix = f"model.layers.{index}."
        qkv = state["attn.qkv_proj.weight"]
        gate, up = state["mlp.gate_up_proj.weight"].split(config.intermediate_size)
        tensors.update({
            prefix + "input_layernorm.weight": state["attn_norm.weight"],
            prefix + "self_attn.q_proj.weight": qkv[:q],
            prefix + "self_attn.k_proj.weight": qkv[q : q + kv],
            prefix + "self_attn.v_proj.weight": qkv[q + kv :],
            prefix + "self_attn.o_proj.weight": state["attn.o_proj.weight"],
            prefix + "post_attention_layernorm.weight": state["mlp_norm.weight"],
            prefix + "mlp.gate_proj.weight": gate,
            prefix + "mlp.up_proj.weight": up,
            prefix + "mlp.down_proj.weight": state["mlp.down_proj.weight"],
        })  # fmt: skip
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()},
              str(folder / "model.safetensors"))  # fmt: skip
    hf = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(hf), encoding="utf-8")
    return folder


def signed_last_stage_work(
    job: TrainingJob, full, ends, signer: PeerSigner, *, scale: float = 1.0
) -> TrainingEvidence:  # type: ignore[no-untyped-def]
    """A last-stage peer's two microbatches and its share (times `scale`: a liar's),
    signed as a peer signs them."""
    trainer = StageTrainer(sub_span(full, 2, 4), job.optimizer, seed=job.seed)
    log, tensors = ClaimLog(), []
    generator = torch.Generator().manual_seed(3)
    for key in ("a", "b"):
        hidden = torch.randn(2, 8, ends.config.hidden_size, generator=generator)
        labels = torch.randint(0, ends.config.vocab_size, (2, 8), generator=generator)
        loss, grad_in = trainer.loss_backward(key, hidden, labels, ends)
        log.forwarded(key, hidden, None)
        log.backwarded(key, labels, grad_in, loss)
        tensors += [hidden, labels, grad_in]
    share = (trainer.gradient() * scale).float()
    claim = ShareClaim(
        peer=signer.peer_id, job=job.job_id, stage=1, step=0, round=0,
        weights=weights_digest(trainer.params), share=tensor_digest(share),
        works=tuple(log.works), issued_s=time.time(),
    )  # fmt: skip
    weights = [param.detach().clone() for param in trainer.params]
    return TrainingEvidence(job, sign_claim(signer, claim), share, weights, tensors)
