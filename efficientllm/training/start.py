"""Where a run starts from: its own checkpoint (resume), another run's model weights
(finetune), or the configured model (fresh initialisation, or `model.from_hf`'s weights).

- Resume loads everything: weights, optimizer, LR schedule, iteration, data position, RNG and
  pruning state (`checkpoint.load`).
- A weights start is Megatron-LM's `--finetune`: only the model weights, into a model built
  from the checkpoint's Architecture (the model config must be the one it was trained from;
  a pruned checkpoint brings its own widths, `checkpoint.architecture_for_load`), with a fresh
  optimizer, LR schedule, data position and iteration 0 (`checkpoint.start_from_weights`).
  `checkpoint.finetune: true` asks for it; a weights-only checkpoint (`efficientllm import hf`)
  starts that way whatever the flag.
- With `checkpoint.finetune`, once the run's own save directory holds a checkpoint that one is
  resumed instead, so a preempted finetune carries on (Megatron-LM applies `--finetune` only
  while `--load` has no checkpoint of this run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from efficientllm.config import Config
from efficientllm.training import checkpoint


@dataclass(frozen=True)
class Start:
    checkpoint: Path | None = None  # None: the configured model, freshly initialised
    weights_only: bool = False

    @property
    def resumes(self) -> bool:
        return self.checkpoint is not None and not self.weights_only


def _is_weights_only(ckpt: Path) -> bool:
    return bool(checkpoint.read_meta(ckpt).get("weights_only"))


def resolve_start(config: Config, save_dir: Path) -> Start:
    """The checkpoint a run starts from and how (see the module docstring)."""
    c = config.checkpoint
    if not c.load:
        return Start()
    if c.finetune:
        own = checkpoint.find_checkpoint(save_dir, c.fallback_to_previous)
        if own is not None:
            return Start(own, weights_only=_is_weights_only(own))
    found = checkpoint.find_checkpoint(c.load, c.fallback_to_previous)
    if found is None:
        if c.finetune:
            raise checkpoint.CheckpointError(f"checkpoint.finetune: no checkpoint in {c.load} to start from")
        return Start()
    return Start(found, weights_only=c.finetune or _is_weights_only(found))


def with_checkpoint_tokenizer(config: Config) -> Config:
    """A finetune reads its data with the tokenizer stored in the checkpoint it starts from,
    unless `data.tokenizer_model` names one (a copy; unchanged otherwise, and when the
    checkpoint stores none)."""
    if not config.checkpoint.finetune or config.data.tokenizer_model:
        return config
    found = checkpoint.find_checkpoint(config.checkpoint.load)
    if found is None or not (found / checkpoint.TOKENIZER_DIR).is_dir():
        return config  # resolve_start names a missing checkpoint; one without a tokenizer keeps the data's
    stored = str(found / checkpoint.TOKENIZER_DIR)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer_model=stored))


def describe_start(start: Start, config: Config, iteration: int) -> str | None:
    """The log line that says where the run started from (None: a fresh start as configured)."""
    if start.resumes:
        return f"resumed from {start.checkpoint} at iteration {iteration}"
    if start.checkpoint is not None:
        return (f"started from the model weights of {start.checkpoint} (finetune: fresh optimizer, "
                f"LR schedule and data position, iteration 0)")
    if config.checkpoint.load:
        return f"no checkpoint in {config.checkpoint.load}: starting from scratch"
    return None
