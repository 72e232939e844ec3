"""SmolLM2 on real ranks: at TP2 PP2 every rank reads only its slices (of the safetensors, or of
the checkpoint `import hf` writes on those ranks) and the logits are transformers' own (fp32,
max |Δlogit| <= 1e-4); continued pretraining under PAP at TP2 starts from the model's own loss
and prunes it."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from efficientllm import assets
from efficientllm.data.preprocess import preprocess_files
from efficientllm.data.tokenizer import load_tokenizer
from tests.distributed.launch import REPO, run_ranks

TOLERANCE = 1e-4


def test_smollm2_at_tp2pp2_gives_transformers_logits_from_the_hf_files_and_from_its_import(
        smollm2_hf_dir, smollm2_tokens, smollm2_reference_logits, tmp_path):
    torch.save(smollm2_tokens, tmp_path / "tokens.pt")
    # SmolLM2's 3 KV heads do not divide TP2: each layer gets one all-zero KV group (exact)
    run_ranks(4, [str(REPO / "tests/interop/workers/hf_model.py"), str(smollm2_hf_dir), str(tmp_path / "tokens.pt"),
                  str(tmp_path), "2", "2"], tmp_path / "logs", timeout=600)
    for name in ("from_hf", "imported"):
        logits = torch.load(tmp_path / f"{name}.pt")
        assert logits.shape == smollm2_reference_logits.shape
        assert (logits - smollm2_reference_logits).abs().max() <= TOLERANCE, name
    meta = json.loads((tmp_path / "ckpt/iter_0000000/efficientllm.json").read_text())
    assert meta["parallel"]["tensor_model_parallel_size"] == 2 and meta["provenance"]["padded_to_tp"]


@pytest.fixture(scope="module")
def python_docs(smollm2_hf_dir, tmp_path_factory) -> dict[str, str]:
    """The Python tutorial (Debian's python3.11-doc reST sources) tokenised with SmolLM2's tokenizer."""
    try:
        root = assets.debian_package("python3.11-doc")
    except assets.AssetUnavailable as err:
        pytest.skip(f"python3.11-doc cannot be had here: {err}")
    files = sorted(glob.glob(f"{root}/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"))
    out = tmp_path_factory.mktemp("python_docs")
    tokenizer = load_tokenizer(smollm2_hf_dir)
    preprocess_files(files[:-2], tokenizer, out / "train")
    preprocess_files(files[-2:], tokenizer, out / "valid")
    return {"train": str(out / "train"), "valid": str(out / "valid")}


def _source_loss(hf_dir: Path, batches: list[dict[str, torch.Tensor]]) -> float:
    """transformers' loss on the micro-batches, averaged the way the trainer averages them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    losses = []
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["tokens"]).logits
            token_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
            mask = batch["loss_mask"].flatten().float()
            losses.append((token_loss * mask).sum() / mask.sum())
    return torch.stack(losses).mean().item()


def test_smollm2_continues_pretraining_under_pap_at_tp2(smollm2_hf_dir, python_docs, tmp_path):
    config = {
        "run_dir": str(tmp_path / "run"),
        "model": {"from_hf": str(smollm2_hf_dir), "from_hf_pad_to_tp": True},
        "parallel": {"tensor_model_parallel_size": 2},
        "data": {"data_path": [python_docs["train"]], "valid_data_path": [python_docs["valid"]], "seq_length": 64},
        "training": {"micro_batch_size": 1, "global_batch_size": 2, "train_iters": 2, "lr": 1e-5, "min_lr": 1e-6,
                     "lr_warmup_iters": 1, "log_interval": 1, "eval_interval": 0, "tensorboard": False},
        "checkpoint": {"save": str(tmp_path / "ckpt")},
        "prune": {"enabled": True, "target_ratio": 0.95, "start_step": 1, "end_step": 1, "align": 2},
        "saliency": {"hessian_window": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run_ranks(2, [str(REPO / "tests/interop/workers/continue_pretraining.py"), str(tmp_path), str(tmp_path / "config.yaml")],
              tmp_path / "logs", timeout=600)
    result = json.loads((tmp_path / "result.json").read_text())
    assert all(math.isfinite(loss) for loss in result["losses"])
    # step 1 is the imported model's loss on the first batch, before any update
    first_batch = torch.load(tmp_path / "first_batch.pt")
    assert result["losses"][0] == pytest.approx(_source_loss(smollm2_hf_dir, first_batch), rel=1e-4)
    assert len(result["events"]) >= 1 and result["params_after"] < result["params_before"]
