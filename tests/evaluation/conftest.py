"""Models to evaluate, made once per session: a tiny Hugging Face Llama with our real
sentencepiece tokenizer, and a tiny run really trained and pruned to per-layer widths (with
zero-shot tasks and bits per byte evaluated during training), whose checkpoint stores its
tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.distributed.conftest import tiny_corpus  # noqa: F401  (the session's corpus fixture)
from tests.distributed.launch import REPO

# A source model whose layers differ, pruned to 70 %: the result has per-layer widths.
SOURCE_LAYERS = [
    {"num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 128},
    {"num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 96},
    {"num_attention_heads": 2, "num_query_groups": 2, "ffn_hidden_size": 128},
    {"num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 64},
]
SEQ_LENGTH = 128
TRAINING_TASKS = ["arc_easy", "winogrande"]
TRAINING_TASKS_LIMIT = 20


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "efficientllm", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """Real English-and-code text with non-ASCII bytes: a stdlib module's source and docs."""
    import textwrap

    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text(Path(textwrap.__file__).read_text() + "\nNaïve café, déjà vu — 3×4 ≠ 12½.\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_hf(tiny_corpus, tmp_path_factory) -> Path:
    """A random 2-layer LlamaForCausalLM saved with our 512-piece sentencepiece tokenizer
    (its Hugging Face conversion: BOS = our EOD, no special tokens added)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from efficientllm.data.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("tiny_hf")
    tokenizer = load_tokenizer(tiny_corpus["tokenizer"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.eod, eos_token_id=tokenizer.eod)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save(out)
    return out


@pytest.fixture(scope="session")
def pruned_run(tiny_corpus, text_file, tmp_path_factory) -> Path:
    """`efficientllm train` on the tiny corpus: 12 steps, pruned to 70 % between steps 3 and 8,
    evaluating TRAINING_TASKS and `text_file` every 6 steps. Returns the run directory."""
    root = tmp_path_factory.mktemp("pruned_run")
    config = {
        "run_dir": str(root / "run"),
        "model": {"hidden_size": 64, "num_layers": 4, "layers": SOURCE_LAYERS},
        "data": {"data_path": [tiny_corpus["train"]], "valid_data_path": [tiny_corpus["valid"]],
                 "tokenizer_model": tiny_corpus["tokenizer"], "seq_length": SEQ_LENGTH},
        "training": {"micro_batch_size": 2, "global_batch_size": 4, "train_iters": 12, "lr": 3e-3,
                     "lr_warmup_iters": 1, "log_interval": 2, "eval_interval": 6, "eval_iters": 2,
                     "tensorboard": False, "eval_tasks": TRAINING_TASKS, "eval_tasks_limit": TRAINING_TASKS_LIMIT,
                     "eval_text": [str(text_file)]},
        "prune": {"enabled": True, "target_ratio": 0.7, "start_step": 3, "end_step": 8, "interval": 1,
                  "min_hidden": 16, "align": 2},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    done = run_cli("train", "--config", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    run = root / "run"
    arch = json.loads((run / "architecture.json").read_text())
    assert len({tuple(layer.values()) for layer in arch["layers"]}) > 1, "pruned to per-layer widths"
    return run


@pytest.fixture(scope="session")
def checkpoint_evals(pruned_run, text_file, tmp_path_factory) -> dict[str, dict]:
    """`eval mc` (TRAINING_TASKS, their limit) and `eval ppl` (text_file) of the pruned run's
    final checkpoint in one process, written where a run's evaluations go (RUN_DIR/eval/)."""
    mc = run_cli("eval", "mc", str(pruned_run / "checkpoints"), "--tasks", ",".join(TRAINING_TASKS),
                 "--limit", str(TRAINING_TASKS_LIMIT), "--batch-size", "2")
    assert mc.returncode == 0, mc.stderr[-3000:]
    ppl = run_cli("eval", "ppl", str(pruned_run / "checkpoints"), "--text", str(text_file))
    assert ppl.returncode == 0, ppl.stderr[-3000:]
    return {p.stem.split("-")[0]: json.loads(p.read_text()) for p in (pruned_run / "eval").glob("*-iter_*.json")}
