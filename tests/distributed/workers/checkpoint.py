"""Worker for checkpoint tests: train (saving/resuming per the config) or load and evaluate.

Usage: python tests/distributed/workers/checkpoint.py MODE OUT_DIR CONFIG [KEY=VALUE ...]
  train   train, write OUT_DIR/rank{R}.json (start iteration, losses, digests of the parameters
          and of the optimizer state) and logits.pt as below, exit with the trainer's exit code
  logits  load the checkpoint, write OUT_DIR/logits.pt (full-vocab logits of the first
          training micro-batch, from the last stage's TP rank 0) and the eval loss
With CRASH_IN_SAVE=ITERATION:RANK in the environment, that rank SIGKILLs itself halfway
through the save of that iteration (after its shards are written, before the rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

from efficientllm import distributed
from efficientllm.config import load_config
from efficientllm.training.batches import micro_batches
from efficientllm.training.trainer import Trainer
from tests.distributed.workers.train import global_name


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def parameter_digests(trainer: Trainer) -> dict[str, str]:
    digests = {}
    for chunk in trainer.model:
        layers = chunk.module.decoder.layers
        offset = layers[0].layer_number - 1 if len(layers) else 0
        for name, param in chunk.named_parameters():
            digests[global_name(name, offset)] = _digest([param])
    return digests


def optimizer_digest(trainer: Trainer) -> dict[str, object]:
    tensors, steps = [], []
    for part in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        inner = part.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                tensors += [state["exp_avg"], state["exp_avg_sq"], p]
                steps.append(float(state["step"]))
    return {"moments_and_main_params": _digest(tensors), "steps": sorted(set(steps)),
            "lr": trainer.optimizer.param_groups[0]["lr"]}


def crash_in_save(spec: str, rank: int) -> None:
    iteration, victim = (int(x) for x in spec.split(":"))
    import megatron.core.dist_checkpointing as dist_checkpointing

    original_save = dist_checkpointing.save

    def save(state, path, *args, **kwargs):
        result = original_save(state, path, *args, **kwargs)
        if rank == victim and Path(path).name.startswith(f"iter_{iteration:07d}"):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    dist_checkpointing.save = save


def logits(trainer: Trainer, out_dir: Path) -> None:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    c = trainer.config
    batch = next(micro_batches(trainer.data.train, 0, c.training.micro_batch_size, trainer.dp_rank, trainer.dp_size,
                               distributed.device()))
    kept = {}

    def forward_step(data_iterator, model):
        output = model(batch["tokens"], batch["position_ids"], None)

        def keep(output_tensor):
            kept["logits"] = gather_from_tensor_model_parallel_region(output_tensor).detach().clone()
            return output_tensor.sum() * 0, {}

        return output, keep

    for chunk in trainer.model:
        chunk.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]),
            model=trainer.model[0] if len(trainer.model) == 1 else trainer.model,
            num_microbatches=1, seq_length=c.data.seq_length,
            micro_batch_size=c.training.micro_batch_size, forward_only=True,
        )
    evaluation = trainer.evaluate() if trainer.data.valid is not None else {"loss": None}
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0 \
            and parallel_state.get_data_parallel_rank() == 0:
        torch.save({"logits": kept["logits"], "eval_loss": evaluation["loss"]}, out_dir / "logits.pt")


def main() -> None:
    mode, out_dir, config_path, *overrides = sys.argv[1:]
    out_dir = Path(out_dir)
    trainer = Trainer(load_config(config_path, overrides))
    if os.environ.get("CRASH_IN_SAVE"):
        crash_in_save(os.environ["CRASH_IN_SAVE"], trainer.launch.rank)
    try:
        trainer.setup()
        start = trainer.state.iteration
        if mode == "logits":
            logits(trainer, out_dir)
            return
        state = trainer.train()
        logits(trainer, out_dir)
        record = {
            "start_iteration": start,
            "iteration": state.iteration,
            "consumed_samples": state.consumed_samples,
            "losses": [h["loss"] for h in state.history],
            "digests": parameter_digests(trainer),
            "optimizer": optimizer_digest(trainer),
            "exit_code": trainer.exit_code,
            "architecture": trainer.arch.to_dict(),
        }
        Path(out_dir, f"rank{trainer.launch.rank}.json").write_text(json.dumps(record))
    finally:
        trainer.close()
    sys.exit(trainer.exit_code)


if __name__ == "__main__":
    main()
