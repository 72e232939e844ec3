"""Pruning: plain tensor math (layout, selection, compensation) behind a Plan.

Nothing here knows about process groups: the distributed layer gathers scores into one global
table, identical on every rank, and calls these functions.
"""

from efficientllm.pruning.compensation import (
    Compensated,
    damped_inverse,
    kept_columns,
    obs_remove_columns,
    obs_step,
    reconstruction_error,
    slice_hessian,
)
from efficientllm.pruning.layout import (
    GroupSizes,
    LayerLayout,
    complement,
    group_sizes,
    kept_hidden,
)
from efficientllm.pruning.plan import KINDS, Plan, kind_totals, pruning_ratios
from efficientllm.pruning.selection import (
    Constraints,
    Selection,
    Unit,
    check_reachable,
    select,
    smallest_reachable,
)

__all__ = [
    "KINDS",
    "Compensated",
    "Constraints",
    "GroupSizes",
    "LayerLayout",
    "Plan",
    "Selection",
    "Unit",
    "check_reachable",
    "complement",
    "damped_inverse",
    "group_sizes",
    "kept_columns",
    "kept_hidden",
    "kind_totals",
    "obs_remove_columns",
    "obs_step",
    "pruning_ratios",
    "reconstruction_error",
    "select",
    "slice_hessian",
    "smallest_reachable",
]
