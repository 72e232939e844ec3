"""`efficientllm import hf HF_DIR OUT_CKPT [--tp N --pp M]`: a Hugging Face Llama-family model
becomes one of our torch_dist checkpoints (iteration 0, weights only, with its tokenizer and
hyper-parameters), which `checkpoint.load_model_weights` reads at any TP/PP and `checkpoint.load`
starts a run from.

Everything is checked before any work (config, every shard and tensor shape, tokenizer vocab,
the layout); then each of the TP x PP ranks reads only the slices it owns and writes its shards.
Without a launcher, a TP x PP > 1 import starts its ranks itself with torchrun. The checkpoint is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from efficientllm.architecture import Architecture
from efficientllm.config import Config, ModelConfig, ParallelConfig
from efficientllm.interop.errors import ModelImportError
from efficientllm.interop.hf_config import HFModelSpec, read_hf_config, resolve_from_hf
from efficientllm.interop.hf_weights import SafetensorsWeights, check_weights, load_into_chunks


@dataclass(frozen=True)
class ImportPlan:
    """A checked import: what is read, what is built, and the run config it records."""

    spec: HFModelSpec
    arch: Architecture  # what is built: the model's widths, padded to TP when asked
    config: Config


def open_weights(hf_dir: str | Path) -> tuple[HFModelSpec, SafetensorsWeights]:
    """The checked config and the safetensors weights of an HF directory (headers only read)."""
    spec = read_hf_config(hf_dir)
    weights = SafetensorsWeights(hf_dir)
    check_weights(weights, spec.arch)
    return spec, weights


def load_hf_weights(chunks: list, hf_dir: str | Path, arch: Architecture) -> None:
    """Copy an HF model's weights into this rank's bare GPTModel chunks (built from `arch`, the
    model's widths or fit_to_parallel's padding of them), reading only this rank's slices."""
    _, weights = open_weights(hf_dir)
    load_into_chunks(chunks, weights, arch)


def plan_import(hf_dir: str | Path, tp: int = 1, pp: int = 1, pad_to_tp: bool = False) -> ImportPlan:
    """Every check an import makes of the model before it writes anything; raises ModelImportError."""
    from efficientllm.architecture import architecture_from_config
    from efficientllm.config import ConfigError
    from efficientllm.data import DataError
    from efficientllm.data.tokenizer import load_tokenizer

    base = Config(model=ModelConfig(from_hf=str(Path(hf_dir).resolve()), from_hf_pad_to_tp=pad_to_tp),
                  parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    config = resolve_from_hf(base)
    spec, _ = open_weights(hf_dir)
    # The checkpoint records the model's whole context as its sequence length.
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, seq_length=spec.hparams.max_position_embeddings))
    try:
        config.validate()
        tokenizer = load_tokenizer(hf_dir)
    except (ConfigError, DataError) as err:
        raise ModelImportError(str(err)) from None
    arch = architecture_from_config(config, tokenizer.vocab_size)
    if tokenizer.vocab_size > arch.vocab_size:
        raise ModelImportError(f"the tokenizer of {hf_dir} has {tokenizer.vocab_size} tokens but the model's "
                               f"vocab_size is {arch.vocab_size}: its ids would index past the embedding")
    return ImportPlan(spec, arch, config)


def write_checkpoint(plan: ImportPlan, save_dir: Path) -> Path:
    """On every rank of the formed TP x PP layout: build, load this rank's slices, save."""
    from efficientllm.data.tokenizer import load_tokenizer
    from efficientllm.model import build_model_chunks, model_options
    from efficientllm.training import checkpoint

    chunks = build_model_chunks(plan.arch, model_options(plan.config))
    load_hf_weights(chunks, plan.spec.directory, plan.arch)
    provenance = {"imported_from": str(plan.spec.directory), "hf_architecture": plan.spec.arch.to_dict(),
                  "padded_to_tp": plan.arch != plan.spec.arch}
    return checkpoint.save_model_weights(chunks, save_dir, plan.config, plan.arch,
                                         load_tokenizer(plan.spec.directory), provenance)


def _worker_args(plan: ImportPlan, save_dir: Path) -> list[str]:
    p = plan.config.parallel
    args = [str(plan.spec.directory), str(save_dir), "--tp", str(p.tensor_model_parallel_size),
            "--pp", str(p.pipeline_model_parallel_size)]
    return args + (["--pad-to-tp"] if plan.config.model.from_hf_pad_to_tp else [])


def _launch_ranks(plan: ImportPlan, save_dir: Path) -> None:
    """Run this module on TP x PP local ranks with torchrun (one thread each)."""
    p = plan.config.parallel
    ranks = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "efficientllm.interop.hf_import", *_worker_args(plan, save_dir)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-20:])
        raise RuntimeError(f"import ranks failed (exit {done.returncode}):\n{tail}")


def import_hf(hf_dir: str | Path, out_ckpt: str | Path, tp: int = 1, pp: int = 1, pad_to_tp: bool = False) -> Path:
    """Import an HF model into a new save directory `out_ckpt` (holding iter_0000000); returns it.

    Called from one process, it forms the groups itself (starting TP x PP ranks when that is
    more than one); called on every rank of a formed world of TP x PP, it uses that world."""
    import torch.distributed as dist

    from efficientllm.interop.local_group import single_process_group

    out = Path(out_ckpt)
    if out.exists():
        raise ModelImportError(f"output {out} already exists; give a new directory")
    plan = plan_import(hf_dir, tp, pp, pad_to_tp)
    tmp = out.with_name(f".{out.name}.partial")  # one name every rank writes into
    if dist.is_initialized():
        from megatron.core import parallel_state

        formed = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size())
        if formed != (tp, pp):
            raise RuntimeError(f"import_hf(tp={tp}, pp={pp}) called in a process formed at TP{formed[0]} PP{formed[1]}")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by an import that crashed
        dist.barrier()
        write_checkpoint(plan, tmp)
        if dist.get_rank() == 0:
            os.rename(tmp, out)
        dist.barrier()
        return out
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if tp * pp == 1:
            with single_process_group():
                write_checkpoint(plan, tmp)
        else:
            _launch_ranks(plan, tmp)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _worker_main() -> None:
    """One torchrun rank of a multi-rank import (see _launch_ranks)."""
    from efficientllm import distributed

    parser = argparse.ArgumentParser(description="one rank of `efficientllm import hf`")
    parser.add_argument("hf_dir")
    parser.add_argument("save_dir")
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--pad-to-tp", action="store_true")
    args = parser.parse_args()
    plan = plan_import(args.hf_dir, args.tp, args.pp, args.pad_to_tp)
    with distributed.process_groups(distributed.read_launch_env(), args.tp, args.pp, seed=plan.config.training.seed):
        write_checkpoint(plan, Path(args.save_dir))


if __name__ == "__main__":
    _worker_main()
