"""Pruning: the algorithm as plain tensor math behind a Plan — layout, plan, selection,
targets, compensation, norms, schedule — importing neither torch.distributed nor megatron.

The megatron-bound parts (group maps on model shards, accumulators, Hessian hooks, surgery,
and the one module of collectives) live in `pruning/megatron/`: they gather scores into one
global table, identical on every rank, and call these functions.
"""

from efficientllm.pruning.compensation import (
    Compensated,
    ObsUpdate,
    damped_inverse,
    kept_columns,
    obs_remove_columns,
    obs_step,
    obs_update,
    reconstruction_error,
    slice_hessian,
)
from efficientllm.pruning.layout import GroupSizes, LayerLayout, complement, group_sizes, kept_hidden
from efficientllm.pruning.norms import rms_rescale
from efficientllm.pruning.plan import KINDS, Plan, kind_totals, pruning_ratios
from efficientllm.pruning.schedule import PruningSchedule
from efficientllm.pruning.selection import (
    Constraints,
    Selection,
    Unit,
    check_architecture_reachable,
    check_reachable,
    select,
    select_architecture,
    smallest_reachable,
)
from efficientllm.pruning.targets import as_target_spec, propose_uniform, target_from_spec

__all__ = [
    "KINDS",
    "as_target_spec",
    "Compensated",
    "ObsUpdate",
    "Constraints",
    "GroupSizes",
    "LayerLayout",
    "Plan",
    "PruningSchedule",
    "Selection",
    "Unit",
    "check_architecture_reachable",
    "check_reachable",
    "complement",
    "damped_inverse",
    "group_sizes",
    "kept_columns",
    "kept_hidden",
    "kind_totals",
    "obs_remove_columns",
    "obs_step",
    "obs_update",
    "propose_uniform",
    "pruning_ratios",
    "reconstruction_error",
    "rms_rescale",
    "select",
    "select_architecture",
    "slice_hessian",
    "smallest_reachable",
    "target_from_spec",
]
