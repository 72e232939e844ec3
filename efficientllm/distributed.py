"""torchrun / SLURM environment → torch.distributed + megatron parallel_state.

The launcher's environment is read and checked before any process group is formed, so an
inconsistent SLURM allocation or a layout that does not divide the world stops with one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

import megatron_patches


class LaunchError(RuntimeError):
    pass


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def _int_env(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={env[name]!r} is not an integer")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `scontrol show hostnames` when present, else the
    common `prefix[01-04,07]` form parsed here."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    match = re.match(r"^([^\[,]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise LaunchError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port() -> int:
    """A TCP port on the loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    """torchrun's variables win; under plain `srun` the SLURM ones are used."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
        source = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist and "MASTER_ADDR" not in env:
            raise LaunchError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: cannot find the master")
        addr = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
        job = env.get("SLURM_JOB_ID", "0")
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + int(job) % 20000
        source = "slurm"
    else:
        # One process, no launcher: any free local port (two such runs may share a machine).
        rank, world, local, addr, port, source = 0, 1, 0, "127.0.0.1", free_port(), "single"
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is not in [0, world size {world}) ({source} environment)")
    if not 0 <= local < world:
        raise LaunchError(f"local rank {local} is not in [0, world size {world}) ({source} environment)")
    return LaunchEnv(rank, world, local, addr, port, source)


def initialize(
    launch: LaunchEnv,
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    virtual_pipeline_model_parallel_size: int | None,
    seed: int,
    timeout_minutes: int = 10,
) -> None:
    """Form the process groups (NCCL on GPU, gloo on CPU) and seed every RNG megatron uses."""
    megatron_patches.apply()
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        # More threads than cores per rank oversubscribes the CPU (a step got ~25x slower).
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    set_seed(seed)


def device() -> torch.device:
    """This rank's training device: its GPU (NCCL), else the CPU (gloo). Everything that
    computes or goes through a collective lives here."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")  # cpu-ok: the gloo backend's device, chosen only here


def set_seed(seed: int) -> None:
    # The CPU generator draws the initial weights (use_cpu_initialization) identically on every
    # rank; megatron's tracker derives the per-TP-rank streams from the same seed.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def process_groups(launch: LaunchEnv, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                   virtual_pipeline_model_parallel_size: int | None = None, seed: int = 1234) -> Iterator[None]:
    """The process groups for the duration of a command, seeded: formed here and shut down
    after, or, in a process that already has them (a caller that formed its own), reused at
    the same layout and left for their owner."""
    if not parallel_state.model_parallel_is_initialized():
        initialize(launch, tensor_model_parallel_size, pipeline_model_parallel_size,
                   virtual_pipeline_model_parallel_size, seed)
        try:
            yield
        finally:
            shutdown()
        return
    sizes = (parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_virtual_pipeline_model_parallel_world_size())
    wanted = (tensor_model_parallel_size, pipeline_model_parallel_size, virtual_pipeline_model_parallel_size)
    if sizes != wanted:
        raise LaunchError(f"this process already runs at TP{sizes[0]} PP{sizes[1]} VPP{sizes[2]}, not at "
                          f"TP{wanted[0]} PP{wanted[1]} VPP{wanted[2]}")
    set_seed(seed)
    yield


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_logging_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
