"""Worker for multi-rank tests: train with the library API, then write what each rank holds.

Usage: python tests/distributed/workers/train.py OUT_DIR CONFIG [KEY=VALUE ...]
Writes OUT_DIR/rank{R}.json: the loss history, the parallel coordinates, and a digest of every
local parameter shard under its global name.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from megatron.core import parallel_state

from efficientllm.config import load_config
from efficientllm.training.trainer import Trainer


def global_name(name: str, offset: int) -> str:
    """`module.decoder.layers.3.x` on a later pipeline stage → its global layer number."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers") + 1
        parts[i] = str(int(parts[i]) + offset)
    return ".".join(p for p in parts if p != "module")


def main() -> None:
    out_dir, config_path, *overrides = sys.argv[1:]
    trainer = Trainer(load_config(config_path, overrides))
    try:
        trainer.setup()
        state = trainer.train()
        digests = {}
        for chunk in trainer.model:
            offset = chunk.module.decoder.layers[0].layer_number - 1 if len(chunk.module.decoder.layers) else 0
            for name, param in chunk.named_parameters():
                data = param.detach().contiguous().float().numpy().tobytes()
                digests[global_name(name, offset)] = hashlib.sha256(data).hexdigest()
        record = {
            "losses": [h["loss"] for h in state.history],
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "dp_rank": parallel_state.get_data_parallel_rank(),
            "digests": digests,
            "num_parameters": trainer.arch.num_parameters(),
            "architecture": trainer.arch.to_dict(),
            # The pass, or its record after the rebuild that ends the pruning phase.
            "plans": trainer.checkpointables["pruning"].plans if "pruning" in trainer.checkpointables else [],
        }
        Path(out_dir, f"rank{trainer.launch.rank}.json").write_text(json.dumps(record))
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
