"""What shapes the found architecture on the default job's model: with the saliencies of a short
real training, per-parameter ranking drives the layers to their floors, and a per-kind weight
can keep every layer (and the hidden size) above them — the knob the results compare."""

from __future__ import annotations

import itertools

import torch

from efficientllm.config import load_config
from efficientllm.pruning.megatron.sync import global_score_table
from efficientllm.pruning.selection import select
from efficientllm.training.pruning import PruningPass

SEQ, MICRO = 64, 4


def _zipf_batches(vocab: int, n: int) -> list[dict[str, torch.Tensor]]:
    """Tokens with a text-like (Zipf) frequency profile: rare ids get small embedding gradients."""
    g = torch.Generator().manual_seed(0)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    out = []
    for _ in range(n):
        tokens = torch.multinomial(probs / probs.sum(), MICRO * (SEQ + 1), replacement=True, generator=g)
        tokens = tokens.view(MICRO, SEQ + 1)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                    "position_ids": torch.arange(SEQ).expand(MICRO, SEQ), "loss_mask": torch.ones(MICRO, SEQ)})
    return out


def _default_job_scores(single_rank, tmp_path):
    from efficientllm.architecture import architecture_from_config
    from efficientllm.training.trainer import Trainer

    config = load_config(None, [f"run_dir={tmp_path}", f"data.seq_length={SEQ}", f"training.micro_batch_size={MICRO}",
                                f"training.global_batch_size={MICRO}", "training.lr_warmup_iters=0"])
    trainer = Trainer(config, single_rank)
    trainer.dp_rank, trainer.dp_size, trainer.num_microbatches = 0, 1, 1
    trainer.build_model(architecture_from_config(config, config.data.tokenizer_vocab_size))
    trainer.pruning = PruningPass(trainer, trainer.arch)
    data = itertools.cycle(_zipf_batches(trainer.arch.vocab_size, 4))
    for _ in range(8):
        trainer.train_step(data)
    return trainer.arch, trainer.pruning, global_score_table(trainer.pruning.saliency)


def test_a_kind_weight_keeps_every_layer_of_the_default_job_above_its_floors(single_rank, tmp_path):
    arch, pruning, scores = _default_job_scores(single_rank, tmp_path)
    c, target = pruning.constraints, pruning.schedule.target_params
    found = {}
    for name, normalisation in (("per_parameter", "per_parameter"), ("hidden x0.05", {"hidden": 0.05})):
        selection = select(arch, scores, arch.num_parameters() - target, c, normalisation, phase_target=target)
        assert selection.met
        found[name] = selection.plan.apply(arch)
    at_floor = lambda a: sum(l.ffn_hidden_size == c.min_ffn_per_layer or l.num_attention_heads == c.min_heads_per_layer
                             for l in a.layers)
    assert at_floor(found["per_parameter"]) >= arch.num_layers // 2, found["per_parameter"].table()
    balanced = found["hidden x0.05"]
    assert at_floor(balanced) == 0 and balanced.hidden_size > c.min_hidden, balanced.table()
