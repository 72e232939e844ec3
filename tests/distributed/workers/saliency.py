"""Worker for multi-rank saliency tests: train with accumulators on, open the Hessian window
for the last steps, then write the global score tables (fisher, taylor, group_fisher, and Minitron's
activations from the window) and this rank's reduced Hessians and residual energies.

Usage: python tests/distributed/workers/saliency.py OUT_DIR CONFIG [KEY=VALUE ...]
Writes OUT_DIR/rank{R}.pt: {"tables", "hessians", "energies", "losses", "tp_rank", "tp_size",
"pp_rank", "dp_rank"}.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from efficientllm.config import load_config
from efficientllm.pruning.megatron import sync
from efficientllm.pruning.megatron.hessian import HessianCollector
from efficientllm.pruning.megatron.saliency import SaliencyAccumulator
from efficientllm.training.trainer import Trainer


def main() -> None:
    out_dir, config_path, *overrides = sys.argv[1:]
    config = load_config(config_path, overrides)
    trainer = Trainer(config)
    try:
        trainer.setup()
        # group_fisher: the hidden group sums are completed over TP and PP every step
        scoring = dataclasses.replace(config.saliency, criterion="group_fisher")
        saliency = SaliencyAccumulator(trainer.model, trainer.arch, scoring, hidden_sum=sync.sum_over_model_parallel)
        hessians = HessianCollector(trainer.model, trainer.arch, energies=True, activations=True)
        step = trainer.optimizer.step

        def step_with_saliency():  # what PruningPass does around the optimizer step
            if sync.grads_are_reduce_scattered(trainer.model):
                sync.complete_reduce_scattered_grads(trainer.model)
            saliency.update()
            return step()

        trainer.optimizer.step = step_with_saliency
        iterator = trainer._iterators(trainer.data.train, 0)
        steps, window = config.training.train_iters, config.saliency.hessian_window
        losses = []
        for i in range(steps):
            if i == steps - window:
                hessians.open_window()
            losses.append(trainer.train_step(iterator)["loss"])
        hessians.close_window()
        tables = {c: sync.global_score_table(saliency, c) for c in ("fisher", "taylor", "group_fisher")}
        sync.reduce_window_over_dp(hessians)
        tables["activation"] = sync.global_score_table(saliency, "activation", window=hessians)
        torch.save(
            {
                "tables": tables,
                "hessians": hessians.hessians,
                "energies": hessians.energies,
                "losses": losses,
                "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
                "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                "dp_rank": parallel_state.get_data_parallel_rank(),
            },
            Path(out_dir, f"rank{trainer.launch.rank}.pt"),
        )
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
