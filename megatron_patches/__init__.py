"""The few, version-guarded patches megatron-core needs: CPU/gloo support and per-layer widths.

`apply()` is idempotent. The CPU patches are applied only when CUDA is not available, so a GPU
machine runs megatron-core as shipped. Each patch states the megatron-core versions it was
written against; `apply()` refuses any other version rather than patching blind.
"""

from __future__ import annotations

import torch
from packaging.version import Version

SUPPORTED_MEGATRON_CORE = (Version("0.16.0"), Version("0.17.0"))  # [low, high)

_applied: set[str] = set()


class UnsupportedMegatronVersion(RuntimeError):
    pass


def megatron_core_version() -> Version:
    from megatron.core import package_info

    return Version(package_info.__version__)


def check_version() -> None:
    version = megatron_core_version()
    low, high = SUPPORTED_MEGATRON_CORE
    if not low <= version < high:
        raise UnsupportedMegatronVersion(
            f"megatron-core {version} is not supported by megatron_patches "
            f"(written for >={low},<{high}); pin megatron-core==0.16.1 or port the patches"
        )


def apply() -> set[str]:
    """Apply every patch this machine needs, once; return the names of those applied."""
    check_version()
    from megatron_patches import cpu, distrib_optimizer

    if not torch.cuda.is_available() and "cpu" not in _applied:
        cpu.apply()
        _applied.add("cpu")
    if "distrib_optimizer_step" not in _applied:
        # Needed wherever torch Adam is used (no apex/TE), on GPU as well.
        distrib_optimizer.apply()
        _applied.add("distrib_optimizer_step")
    return set(_applied)
