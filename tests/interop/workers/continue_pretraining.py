"""Worker: continue pretraining a Hugging Face model under PAP (`model.from_hf`) on real ranks.

Usage: python tests/interop/workers/continue_pretraining.py OUT_DIR CONFIG [KEY=VALUE ...]
Rank 0 writes OUT_DIR/result.json (the loss of every step, the pruning events, the parameter
count before and after) and OUT_DIR/first_batch.pt (the micro-batches of the first global batch,
whose mean loss step 1 reports, as the model was before any update).
"""

from __future__ import annotations

import json
import sys
from itertools import islice
from pathlib import Path

import torch

from efficientllm import distributed
from efficientllm.config import load_config
from efficientllm.reporting.plots import read_records
from efficientllm.training.batches import micro_batches
from efficientllm.training.trainer import Trainer


def main() -> None:
    out_dir, config_path, *overrides = sys.argv[1:]
    trainer = Trainer(load_config(config_path, overrides))
    try:
        trainer.setup()
        source_params = trainer.arch.num_parameters()
        t = trainer.config.training
        first = list(islice(micro_batches(trainer.data.train, 0, t.micro_batch_size, trainer.dp_rank, trainer.dp_size,
                                          distributed.device()), trainer.num_microbatches))
        state = trainer.train()
        if trainer.launch.rank == 0:
            torch.save([{k: v.cpu() for k, v in batch.items()} for batch in first], Path(out_dir, "first_batch.pt"))
            record = {
                "losses": [h["loss"] for h in state.history],
                "events": read_records(Path(trainer.config.run_dir) / "metrics.jsonl", "prune"),
                "params_before": source_params,
                "params_after": trainer.arch.num_parameters(),
                "architecture": trainer.arch.to_dict(),
            }
            Path(out_dir, "result.json").write_text(json.dumps(record))
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
