"""The OBS updates of the consumers an event compensates, each computed once per data-parallel
group.

DP replicas hold the same consumers and, once their Hessians are summed, the same problem; so
the compensated consumers are dealt in turn over the DP ranks. Each Hessian is summed onto its
owner only (`sync.reduce_hessians_to_owners`), the owner factors it (`compensation.obs_update`:
one Cholesky factor, |S| solves) and broadcasts the update ([H^-1]_SS)^-1 [H^-1]_S,: — |S| x in
floats, small beside the in x in Hessian — to the other DP ranks (`sync.share_from_owners`).
Every rank then applies the same update to its own rows (`surgery.prune_model`). A consumer
whose Hessian has no usable data is only sliced, and the reason is logged on every rank.
"""

from __future__ import annotations

import torch

from efficientllm.architecture import Architecture
from efficientllm.pruning.compensation import ObsUpdate, obs_update
from efficientllm.pruning.layout import complement
from efficientllm.pruning.megatron import sync
from efficientllm.pruning.megatron.groups import ModuleKey as Key
from efficientllm.pruning.megatron.hessian import HessianCollector
from efficientllm.pruning.megatron.surgery import compensated_inputs
from efficientllm.pruning.plan import Plan

_FALLBACK = -1.0  # the first element of a shared update: 0 = an update follows, -1 = none


def consumer_updates(window: HessianCollector, plan: Plan, arch: Architecture,
                     damping: float) -> tuple[dict[Key, ObsUpdate], list[str]]:
    """(old layer, consumer) -> its OBS update for `plan`, for every consumer on this rank that
    the Plan compensates and that has one; and, for those without, why (one line each). A
    collective over DP: call on every rank."""
    inputs = compensated_inputs(plan, arch)
    keys = sorted((key for key in inputs if key in window.consumers), key=str)
    owners = sync.reduce_hessians_to_owners(window, keys)
    me = sync.data_parallel_rank()
    removed, sizes, mine, reasons = {}, {}, {}, {}
    for key in keys:
        width = window.consumers[key].weight.shape[1]
        removed[key] = complement(width, inputs[key])
        sizes[key] = 1 + removed[key].numel() * width
        if owners[key] != me:
            continue
        update, reasons[key] = obs_update(window.hessians[key], removed[key], damping)
        flag = torch.full((1,), 0.0 if update is not None else _FALLBACK, dtype=torch.float64,
                          device=window.hessians[key].device)
        body = update.solved.reshape(-1) if update is not None else torch.zeros(sizes[key] - 1, dtype=torch.float64,
                                                                                  device=flag.device)
        mine[key] = torch.cat([flag, body])
    device = next(iter(window.consumers.values())).weight.device if keys else None
    shared = sync.share_from_owners(mine, owners, sizes, torch.float64, device)
    updates, fallbacks = {}, []
    for key in keys:
        packed = shared[key]
        if float(packed[0]) == _FALLBACK:
            fallbacks.append(key)
            continue
        drop = removed[key].to(packed.device)
        updates[key] = ObsUpdate(inputs[key].to(packed.device), drop, packed[1:].view(drop.numel(), -1))
    return updates, _fallback_lines(fallbacks, reasons)


def _fallback_lines(fallbacks: list[Key], reasons: dict[Key, str | None]) -> list[str]:
    """Each fallback's reason, from its owner (gathered only when there is one to tell)."""
    if not fallbacks:
        return []
    known: dict[Key, str] = {}
    for theirs in sync.gather_over_dp({key: r for key, r in reasons.items() if r is not None}):
        known.update(theirs)
    return [f"{'' if layer is None else f'layers.{layer}.'}{name}: {known[(layer, name)]}" for layer, name in fallbacks]
