"""Worker: a Hugging Face model on real TP x PP ranks, two ways.

Usage: python tests/interop/workers/hf_model.py HF_DIR TOKENS_PT OUT_DIR TP PP
1. `from_hf.pt`: the model built at this layout (widths padded to TP with all-zero KV groups),
   each rank reading only its slices of the safetensors (model.from_hf's path);
2. `imported.pt`: the checkpoint `import_hf` writes on these same ranks (OUT_DIR/ckpt), loaded
   into a fresh model with load_model_weights.
Each file holds the full-vocab logits of TOKENS_PT ([1, T]), written by the last stage's TP rank 0.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from efficientllm import distributed
from efficientllm.interop.hf_import import import_hf, load_hf_weights, plan_import
from efficientllm.model import build_model_chunks, model_options
from efficientllm.training import checkpoint


@torch.no_grad()
def pipeline_logits(chunks: list, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits through megatron's pipeline schedule; None off the last stage."""
    kept = {}
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)

    def forward_step(data_iterator, model):
        output = model(tokens, positions, None)

        def keep(output_tensor):
            kept["logits"] = gather_from_tensor_model_parallel_region(output_tensor).clone()
            return output_tensor.sum() * 0, {}

        return output, keep

    for chunk in chunks:
        chunk.eval()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=chunks[0],
                                num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=1, forward_only=True)
    return kept.get("logits")


def _write(logits: torch.Tensor | None, path: Path) -> None:
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(logits, path)


def main() -> None:
    hf_dir, tokens_path, out_dir, tp, pp = sys.argv[1:]
    out, tp, pp = Path(out_dir), int(tp), int(pp)
    tokens = torch.load(tokens_path)
    plan = plan_import(hf_dir, tp, pp, pad_to_tp=True)
    distributed.initialize(distributed.read_launch_env(), tp, pp, None, plan.config.training.seed)
    try:
        chunks = build_model_chunks(plan.arch, model_options(plan.config))
        load_hf_weights(chunks, hf_dir, plan.arch)
        _write(pipeline_logits(chunks, tokens), out / "from_hf.pt")

        saved = import_hf(hf_dir, out / "ckpt", tp, pp, pad_to_tp=True)
        fresh = build_model_chunks(plan.arch, model_options(plan.config))
        checkpoint.load_model_weights(fresh, checkpoint.find_checkpoint(saved))
        _write(pipeline_logits(fresh, tokens), out / "imported.pt")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
