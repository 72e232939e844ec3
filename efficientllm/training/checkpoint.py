"""Sharded checkpoints (megatron-core `dist_checkpointing`, `torch_dist`) with exact resume.

Layout, Megatron-LM style, under the save directory:

    latest_checkpointed_iteration.txt     the newest complete iteration (written last)
    iter_0000100/                         one complete checkpoint
        metadata.json, .metadata, *.distcp, common.pt    megatron-core: model + optimizer shards
        efficientllm.json                 Architecture, iteration, data position, layout, config
        trainer_state.pt                  LR scheduler, TrainState, `extra` (pruning state, ...)
        rng/rank_00000.pt                 every rank's RNG states
        tokenizer/                        the run's tokenizer (load_tokenizer and transformers read it)
        manifest.json                     every file above with its size and CRC32 (written last)

A checkpoint is written under `iter_0000100.partial/`, synced, and renamed: a directory named
`iter_N` is complete by construction. The tracker is replaced atomically after the rename, and
older checkpoints beyond `keep_last` are deleted only after that, so a crash at any moment leaves
the previous complete checkpoint loadable.

Loading rebuilds the model from the stored Architecture before any shard is read, so a pruned
model loads at its own shapes and at any TP/PP that divides its widths.

A weights-only checkpoint (`save_model_weights`, what `efficientllm import hf` writes at
iteration 0) holds the model shards, metadata and tokenizer; `load` starts a run from it with
the run's fresh optimizer and schedule, as Megatron-LM does for a pretrained `--load`.

Extra state (pruning schedule, saliency accumulators, ...) goes through
`Trainer.checkpointables`: name -> object with `state_dict()`/`load_state_dict(sd)` (replicated
state: saved by rank 0, loaded on every rank) or with `sharded_state_dict()` (megatron
ShardedTensors: saved in the sharded checkpoint and resharded on load). An object may also
have `summary() -> dict` (JSON), shown by `efficientllm inspect`, and `local_state_dict()` /
`load_local_state_dict(sd)` for state that differs per rank (saliency of this rank's shards):
saved in the rank's file beside its RNG states and restored only at the same layout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from efficientllm.atomic import OLD_SUFFIX, fsync_dir, fsync_file, replace_dir, write_atomically
from efficientllm.architecture import Architecture

if TYPE_CHECKING:
    from efficientllm.config import Config
    from efficientllm.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Run(Protocol):
    """What a checkpoint saves and restores: the parts of a running Trainer (training/trainer.py)."""

    config: "Config"
    arch: Architecture
    model: list  # megatron DDP-wrapped chunks
    optimizer: Any
    scheduler: Any
    state: Any  # trainer.TrainState
    data: Any  # data.prepare.PreparedData
    dp_size: int
    checkpointables: dict[str, Any]
    pending_extra_state: dict[str, Any]

FORMAT = "efficientllm-checkpoint/1"
TRACKER = "latest_checkpointed_iteration.txt"
META = "efficientllm.json"
TRAINER_STATE = "trainer_state.pt"
RNG_DIR = "rng"
TOKENIZER_DIR = "tokenizer"
MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
# The distributed optimizer's layout in the checkpoint: gathered over DP into one tensor per
# parameter state, so it reshards over TP/PP/DP like the model (megatron-core 0.16 no longer
# supports the flattened-range "fully_sharded_model_space" format).
DIST_OPTIM_SHARDING = "fully_reshardable"
# Fields of the model config that decide the Architecture a checkpoint was built from.
_MODEL_SHAPE_FIELDS = (
    "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "head_dim", "layers", "vocab_size", "untie_embeddings_and_output_weights",
)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or does not fit this run."""


# ----- directory layout ------------------------------------------------------------------------
def iteration_dir(save_dir: str | Path, iteration: int) -> Path:
    return Path(save_dir) / f"iter_{iteration:07d}"


def complete_iterations(save_dir: str | Path) -> list[int]:
    """Iterations with a complete checkpoint directory (renamed into place), oldest first."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER_DIR.match(p.name))]
    return sorted(found)


def read_tracker(save_dir: str | Path) -> int | None:
    path = Path(save_dir) / TRACKER
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"tracker file {path} does not hold an iteration number: {text!r}")
    return int(text)


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def crc32_of(path: Path) -> int:
    """zlib's CRC32 of a file, read in 1 MiB blocks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def _checkpoint_files(ckpt_dir: Path) -> list[Path]:
    return [p for p in _files_under(ckpt_dir) if p.name != MANIFEST]


def crc32_share(ckpt_dir: Path, rank: int, world_size: int) -> dict[str, int]:
    """The CRC32s of this rank's share of a checkpoint's files (every `world_size`-th one), so
    that the ranks of a save read the checkpoint once between them."""
    files = _checkpoint_files(ckpt_dir)
    return {str(p.relative_to(ckpt_dir)): crc32_of(p) for p in files[rank::world_size]}


def write_manifest(ckpt_dir: Path, crcs: dict[str, int] | None = None) -> None:
    """Sync every file of the checkpoint and record its size and CRC32 (from `crcs`, else read
    here); the manifest goes last."""
    crcs = crcs or {}
    files = {}
    for path in _checkpoint_files(ckpt_dir):
        fsync_file(path)
        name = str(path.relative_to(ckpt_dir))
        files[name] = {"size": path.stat().st_size, "crc32": crcs[name] if name in crcs else crc32_of(path)}
    for sub in {p.parent for p in _files_under(ckpt_dir)}:
        fsync_dir(sub)
    write_atomically(ckpt_dir / MANIFEST, json.dumps({"format": FORMAT, "files": files}, indent=1), durable=True)


def verify(ckpt_dir: str | Path) -> dict[str, Any]:
    """Check that every file the checkpoint was written with is there with its size and CRC32
    (manifests of older checkpoints hold sizes only); return its metadata. Raises
    CheckpointError naming the first missing, truncated or altered file."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    manifest_path = ckpt_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: {manifest_path} is missing") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint manifest {manifest_path} is corrupt: {err}") from None
    for name, record in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        size, crc = (record, None) if isinstance(record, int) else (record["size"], record["crc32"])
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint file {path} is truncated or altered: {actual} bytes, written with {size}")
        if crc is not None and crc32_of(path) != crc:
            raise CheckpointError(f"checkpoint file {path} is corrupt: its CRC32 differs from the one it was written with")
    return read_meta(ckpt_dir)


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint metadata {path} is missing") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint metadata {path} is corrupt: {err}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def find_checkpoint(load: str | Path, fallback_to_previous: bool = False) -> Path | None:
    """The checkpoint to resume from: `load` may be a save directory (the tracker's iteration,
    else the newest complete one) or one `iter_N` directory. None when there is none yet.
    A damaged checkpoint is an error unless `fallback_to_previous`, which then loads the newest
    older complete one and says so."""
    load = Path(load)
    if _ITER_DIR.match(load.name) and load.is_dir():
        verify(load)
        return load
    complete = complete_iterations(load)
    tracked = read_tracker(load)
    if tracked is None and not complete:
        return None
    newest = tracked if tracked is not None else complete[-1]
    candidates = [newest] + [i for i in reversed(complete) if i < newest]
    for index, iteration in enumerate(candidates):
        path = iteration_dir(load, iteration)
        try:
            if not path.is_dir():
                raise CheckpointError(f"tracker {load / TRACKER} names iteration {iteration} but {path} does not exist")
            verify(path)
        except CheckpointError as err:
            if not fallback_to_previous:
                raise CheckpointError(f"{err} (set checkpoint.fallback_to_previous=true to load the previous complete checkpoint)") from None
            logger.warning("checkpoint %s is not loadable: %s", path, err)
            _say(f"WARNING: {err}; falling back to the previous complete checkpoint")
            continue
        if index > 0:
            _say(f"WARNING: loading the previous complete checkpoint {path}")
        return path
    raise CheckpointError(f"no loadable checkpoint in {load} (tried iterations {candidates})")


def _say(text: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


def checkpoint_tokenizer(ckpt: str | Path) -> Path:
    """The tokenizer directory stored in a checkpoint (a save directory's newest, or one iter_N)."""
    found = find_checkpoint(ckpt)
    if found is None:
        raise CheckpointError(f"no checkpoint in {ckpt}")
    path = found / TOKENIZER_DIR
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {found} stores no tokenizer ({TOKENIZER_DIR}/ is missing); give the tokenizer explicitly")
    return path


def is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST).is_file() or (path / TRACKER).is_file() or bool(complete_iterations(path))


def load_tokenizer_from(path: str | Path) -> "Tokenizer":
    """The tokenizer of a checkpoint (its stored one) or of any path `load_tokenizer` reads."""
    from efficientllm.data.tokenizer import load_tokenizer

    path = Path(path)
    return load_tokenizer(checkpoint_tokenizer(path) if path.is_dir() and is_checkpoint(path) else path)


# ----- the Architecture a checkpoint is loaded at ----------------------------------------------
def architecture_for_load(meta: dict[str, Any], config: "Config", ckpt_dir: Path) -> Architecture:
    """The stored Architecture, after checking that the run's model config is the one the
    checkpoint was trained from and that this TP/PP can hold it."""
    arch = Architecture.from_dict(meta["architecture"])
    saved_model = meta["config"]["model"]
    current = dataclasses.asdict(config.model)
    differ = [f for f in _MODEL_SHAPE_FIELDS if saved_model.get(f) != current.get(f)]
    if differ:
        detail = ", ".join(f"model.{f}: config {current.get(f)!r} vs checkpoint {saved_model.get(f)!r}" for f in differ)
        raise CheckpointError(
            f"the model config does not match checkpoint {ckpt_dir} ({detail}); the model is "
            f"rebuilt from the checkpoint's Architecture, so use the model section it was trained with"
        )
    tp = config.parallel.tensor_model_parallel_size
    valid = arch.valid_tensor_parallel_sizes()
    if tp not in valid:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} cannot be loaded at tensor_model_parallel_size {tp}: its "
            f"Architecture's widths allow TP sizes {valid}"
        )
    stages = config.parallel.pipeline_model_parallel_size * (config.parallel.virtual_pipeline_model_parallel_size or 1)
    if arch.num_layers % stages:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has {arch.num_layers} layers, not divisible by {stages} pipeline stages"
        )
    return arch


# ----- what is saved ---------------------------------------------------------------------------
def _model_key(index: int, num_chunks: int) -> str:
    return "model" if num_chunks == 1 else f"model{index}"


def _sharded_state_dict(trainer: "Run", is_loading: bool) -> dict[str, Any]:
    """Model chunks + optimizer (+ sharded extra state) as one megatron sharded state dict."""
    state: dict[str, Any] = {}
    for index, chunk in enumerate(trainer.model):
        state[_model_key(index, len(trainer.model))] = chunk.module.sharded_state_dict()
    optimizer = trainer.optimizer
    if is_loading and trainer.config.parallel.use_distributed_optimizer:
        for part in _parts(optimizer):
            if len(part.optimizer.state) == 0:
                # Its sharded state dict reads the (empty) state it will be loaded into.
                part._init_optimizer_states_with_dummy_values()
    metadata = {"distrib_optim_sharding_type": DIST_OPTIM_SHARDING}
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    extra = {name: obj.sharded_state_dict() for name, obj in trainer.checkpointables.items()
             if hasattr(obj, "sharded_state_dict")}
    if extra:
        state["extra"] = extra
    return state


def _parts(optimizer: Any) -> list[Any]:
    """The megatron optimizers inside a (possibly chained) optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "megatron_tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    get_cuda_rng_tracker().set_states(state["megatron_tracker"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def _layout(trainer: "Run") -> dict[str, Any]:
    import torch.distributed as dist

    p = trainer.config.parallel
    return {
        "tensor_model_parallel_size": p.tensor_model_parallel_size,
        "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
        "data_parallel_size": trainer.dp_size,
        "world_size": dist.get_world_size(),
        "use_distributed_optimizer": p.use_distributed_optimizer,
    }


def _meta_record(config: "Config", arch: Architecture, iteration: int, consumed_samples: int,
                 layout: dict[str, Any]) -> dict[str, Any]:
    seq = config.data.seq_length
    return {
        "format": FORMAT,
        "backend": "torch_dist",
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "consumed_tokens": consumed_samples * seq,
        "seq_length": seq,
        "architecture": arch.to_dict(),
        "num_parameters": arch.num_parameters(),
        "parallel": layout,
        "distrib_optim_sharding_type": DIST_OPTIM_SHARDING,
        "config": config.to_dict(),  # with the model's hyper-parameters (rotary_base, norm_epsilon, ...)
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _meta(trainer: "Run") -> dict[str, Any]:
    summaries = {name: obj.summary() for name, obj in trainer.checkpointables.items() if hasattr(obj, "summary")}
    record = _meta_record(trainer.config, trainer.arch, trainer.state.iteration, trainer.state.consumed_samples,
                          _layout(trainer))
    return {**record, "extra": summaries}


def _trainer_state(trainer: "Run") -> dict[str, Any]:
    return {
        "train_state": dataclasses.asdict(trainer.state),
        "scheduler": trainer.scheduler.state_dict(),
        "extra": {name: obj.state_dict() for name, obj in trainer.checkpointables.items()
                  if not hasattr(obj, "sharded_state_dict")},
    }


def _rng_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / RNG_DIR / f"rank_{rank:05d}.pt"


def _load_onto_this_rank(path: Path) -> Any:
    """torch.load of a file a rank wrote: tensors saved from any GPU come back on this rank's
    device (rank 0 wrote the trainer state from its own GPU; a rank's local GPU index may
    differ after a requeue); host tensors, such as RNG states, stay on the host."""
    import torch

    from efficientllm import distributed

    device = distributed.device()

    def place(storage: Any, location: str) -> Any:
        if location.startswith("cuda") and device.type == "cuda":
            return storage.cuda(device.index)
        return storage  # deserialised on the host

    return torch.load(path, weights_only=False, map_location=place)


# ----- save ------------------------------------------------------------------------------------
def save(trainer: "Run", save_dir: str | Path) -> Path:
    """Write the checkpoint of the current iteration on every rank (a collective call)."""
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    rank = dist.get_rank()
    final = iteration_dir(save_dir, trainer.state.iteration)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # left by a save that crashed
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()

    dist_checkpointing.save(_sharded_state_dict(trainer, is_loading=False), str(partial))
    (partial / RNG_DIR).mkdir(exist_ok=True)
    local = {name: obj.local_state_dict() for name, obj in trainer.checkpointables.items()
             if hasattr(obj, "local_state_dict")}
    torch.save({"rng": rng_state(), "local": local}, _rng_file(partial, rank))
    fsync_file(_rng_file(partial, rank))
    if rank == 0:
        torch.save(_trainer_state(trainer), partial / TRAINER_STATE)
        (partial / META).write_text(json.dumps(_meta(trainer), indent=1))
        if trainer.data is not None:  # the checkpoint carries its tokenizer: export and eval need no other path
            trainer.data.tokenizer.save(partial / TOKENIZER_DIR)
    dist.barrier()

    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, crc32_share(partial, rank, dist.get_world_size()))
    if rank == 0:
        write_manifest(partial, {name: crc for share in shares for name, crc in share.items()})
        replace_dir(partial, final)
        write_atomically(save_dir / TRACKER, f"{trainer.state.iteration}\n", durable=True)
        remove_old(save_dir, trainer.config.checkpoint.keep_last)
    dist.barrier()
    return final


def remove_old(save_dir: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` (0 keeps all), and the leftovers
    of crashed saves and replacements. Called only after a newer checkpoint is complete and tracked."""
    if keep_last > 0:
        for iteration in complete_iterations(save_dir)[:-keep_last]:
            shutil.rmtree(iteration_dir(save_dir, iteration), ignore_errors=True)
    for pattern in (f"iter_*{PARTIAL_SUFFIX}", f"iter_*{OLD_SUFFIX}"):
        for leftover in save_dir.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def save_model_weights(chunks: list[Any], save_dir: str | Path, config: "Config", arch: Architecture,
                       tokenizer: Any, provenance: dict[str, Any]) -> Path:
    """Write a weights-only checkpoint at iteration 0 (what `import hf` writes) on every rank of
    the formed layout: model shards, metadata (`weights_only`, `provenance`) and the tokenizer.
    `load` starts a run from it with a fresh optimizer; `load_model_weights` reads it as usual."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    save_dir = Path(save_dir)
    final = iteration_dir(save_dir, 0)
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({_model_key(i, len(chunks)): chunk.sharded_state_dict() for i, chunk in enumerate(chunks)},
                            str(partial))
    if rank == 0:
        p = config.parallel
        layout = {
            "tensor_model_parallel_size": p.tensor_model_parallel_size,
            "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
            "virtual_pipeline_model_parallel_size": None,
            "data_parallel_size": parallel_state.get_data_parallel_world_size(),
            "world_size": dist.get_world_size(),
            "use_distributed_optimizer": False,
        }
        meta = {**_meta_record(config, arch, 0, 0, layout), "extra": {}, "weights_only": True, "provenance": provenance}
        (partial / META).write_text(json.dumps(meta, indent=1))
        tokenizer.save(partial / TOKENIZER_DIR)
    dist.barrier()
    if rank == 0:
        write_manifest(partial)
        replace_dir(partial, final)
        write_atomically(save_dir / TRACKER, "0\n", durable=True)
    dist.barrier()
    return final


# ----- load ------------------------------------------------------------------------------------
def load_model_weights(chunks: list[Any], ckpt_dir: str | Path) -> dict[str, Any]:
    """Load only the model shards of a checkpoint into this rank's (unwrapped) GPTModel chunks,
    built from the checkpoint's Architecture at any TP/PP that divides it; returns its metadata.
    For inference and export: no optimizer, RNG or trainer state is read."""
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    meta = verify(ckpt_dir)
    template = {_model_key(i, len(chunks)): chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
    try:
        loaded = dist_checkpointing.load(template, str(ckpt_dir))
    except Exception as err:
        raise CheckpointError(f"cannot read the model shards of checkpoint {ckpt_dir}: {type(err).__name__}: {err}".splitlines()[0]) from err
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[_model_key(index, len(chunks))])
    return meta


def start_from_weights(trainer: "Run", ckpt_dir: str | Path) -> dict[str, Any]:
    """Megatron-LM's --finetune: only the model weights of a checkpoint, into a trainer whose
    model was built from its Architecture; the optimizer (its fp32 main params follow the new
    weights), LR schedule, iteration and data position stay fresh. Returns its metadata."""
    meta = load_model_weights([chunk.module for chunk in trainer.model], ckpt_dir)
    trainer.optimizer.reload_model_params()
    return meta


def load(trainer: "Run", ckpt_dir: str | Path) -> dict[str, Any]:
    """Load a verified checkpoint into a trainer whose model was built from its Architecture
    (a weights-only one, such as `import hf` writes, through `start_from_weights`)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    if meta.get("weights_only"):
        return start_from_weights(trainer, ckpt_dir)
    template = _sharded_state_dict(trainer, is_loading=True)
    try:
        loaded = dist_checkpointing.load(template, str(ckpt_dir))
    except Exception as err:  # megatron/torch name neither the file nor the cause in one line
        raise CheckpointError(f"cannot read the shards of checkpoint {ckpt_dir}: {type(err).__name__}: {err}".splitlines()[0]) from err
    for index, chunk in enumerate(trainer.model):
        chunk.module.load_state_dict(loaded[_model_key(index, len(trainer.model))])
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    for name, sd in loaded.get("extra", {}).items():
        trainer.checkpointables[name].load_state_dict(sd)

    state = _load_onto_this_rank(ckpt_dir / TRAINER_STATE)
    trainer.scheduler.num_steps = 0  # megatron's scheduler load adds the saved steps to its own
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.state = type(trainer.state)(**state["train_state"])
    trainer.pending_extra_state = dict(state["extra"])
    for name in list(trainer.pending_extra_state):
        if name in trainer.checkpointables:
            trainer.checkpointables[name].load_state_dict(trainer.pending_extra_state.pop(name))

    saved, now = meta["parallel"], _layout(trainer)
    same_layout = all(saved[k] == now[k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size", "world_size"))
    if same_layout:
        rank_state = _load_onto_this_rank(_rng_file(ckpt_dir, dist.get_rank()))
        set_rng_state(rank_state["rng"])
        for name, sd in rank_state["local"].items():
            trainer.checkpointables[name].load_local_state_dict(sd)
    else:
        _say(f"checkpoint saved at TP{saved['tensor_model_parallel_size']} PP{saved['pipeline_model_parallel_size']} "
             f"DP{saved['data_parallel_size']}: RNG states and per-rank statistics are not restored at this layout")
    return meta
