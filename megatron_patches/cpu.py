"""Run megatron-core on a CPU-only machine with the gloo backend.

Written for megatron-core 0.16.x; applied only when CUDA is not available (see `apply`).
megatron-core hard-codes CUDA in a handful of places (measured facts: shared/design/
MEGATRON_CPU.md). Each patch below is narrow: it touches only what would otherwise raise on a
CPU-only build of torch, so nothing changes where CUDA exists, and no per-op cost is added to
the training step (no global TorchFunctionMode).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any, Callable, Iterator

import torch

# Modules that create tensors with a literal device="cuda" (or 'cuda') in code we run.
MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.grad_scaler",  # a loss scale: what lets the optimizer skip a step
    "megatron.core.transformer.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",
)

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "empty_like", "zeros_like")


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CpuTorch(types.ModuleType):
    """Stands in for `torch` inside one megatron module: factory calls asking for a CUDA device
    get the CPU; every other attribute is torch's own."""

    def __init__(self) -> None:
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, self._cpu_factory(getattr(torch, name)))

    @staticmethod
    def _cpu_factory(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.wraps(factory)
        def create(*args: Any, **kwargs: Any) -> torch.Tensor:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            return factory(*args, **kwargs)

        return create

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def cuda_type_names() -> Iterator[None]:
    """Make `Tensor.type()` report `torch.cuda.*` names, for megatron's dtype checks that
    compare against CUDA type strings (grad clipping, distributed-optimizer param groups)."""
    original = torch.Tensor.type

    def type_(self: torch.Tensor, dtype: Any = None, *args: Any, **kwargs: Any) -> Any:
        if dtype is None and not args and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, *args, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with cuda_type_names():
            return fn(*args, **kwargs)

    return wrapped


def _patch_rng_tracker() -> None:
    """Attention forks megatron's CUDA RNG tracker on every forward: back it by the CPU RNG."""
    from megatron.core.tensor_parallel import random

    def get_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> Any:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    def add(self: Any, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state
    random.CudaRNGStatesTracker.add = add


def _patch_cuda_device_queries() -> None:
    """Buffers allocated on `torch.cuda.current_device()` go to the CPU; syncs are no-ops.
    On a CPU-only torch these calls raise, so redirecting them changes nothing else."""
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _patch_cuda_literals() -> None:
    shim = _CpuTorch()
    for name in MODULES_WITH_CUDA_LITERALS:
        module = importlib.import_module(name)
        module.torch = shim


def _patch_type_checks() -> None:
    from megatron.core.optimizer import distrib_optimizer, optimizer

    optimizer.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(
        optimizer.clip_grad_by_total_norm_fp32
    )
    # bf16 params with fp32 main params: its constructor accepts only torch.cuda.* types.
    fp16 = optimizer.Float16OptimizerWithFloat16Params
    fp16.__init__ = _with_cuda_type_names(fp16.__init__)
    cls = distrib_optimizer.DistributedOptimizer
    cls._build_model_and_main_param_groups = classmethod(
        _with_cuda_type_names(cls._build_model_and_main_param_groups.__func__)
    )


def apply() -> None:
    _patch_rng_tracker()
    _patch_cuda_device_queries()
    _patch_cuda_literals()
    _patch_type_checks()
