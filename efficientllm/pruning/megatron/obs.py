"""The OBS updates of the consumers an event compensates, each computed once per data-parallel
group.

DP replicas hold the same consumers and, once their Hessians are summed, the same problem; so
the compensated consumers are dealt in turn over the DP ranks. Each Hessian is summed onto its
owner only (`sync.reduce_hessians_to_owners`), the owner factors it (`compensation.obs_update`:
one Cholesky factor, |S| solves) and broadcasts the update ([H^-1]_SS)^-1 [H^-1]_S,: — |S| x in
floats, small beside the in x in Hessian — to the other DP ranks (`sync.share_from_owners`).
Every rank then applies the same update to its own rows (`surgery.prune_model`). A consumer
whose Hessian has no usable data is only sliced, and the reason is logged on every rank.

`residual_factors` (`prune.score_after_compensation`) reads the same Hessians before the
selection: for every group, the fraction of its consumer's output error that its OBS update
leaves (`compensation.removal_errors`). Saliency prices a removal as if nothing repaired it;
scaled by this factor it prices what is left after the repair. All consumers' Hessians are then
summed onto their owners once, and `consumer_updates` reuses them.
"""

from __future__ import annotations

import torch

from efficientllm.architecture import Architecture
from efficientllm.pruning.compensation import ObsUpdate, obs_update, removal_errors
from efficientllm.pruning.layout import complement
from efficientllm.pruning.megatron import sync
from efficientllm.pruning.megatron.groups import ModuleKey as Key
from efficientllm.pruning.megatron.groups import ShardGroups
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
    owners = sync.reduce_hessians_to_owners(window, keys)  # each summed once per window
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


def residual_factors(window: HessianCollector, groups: ShardGroups, arch: Architecture,
                     damping: float) -> dict:
    """What each group's OBS update leaves of its consumer's output error, in (0, 1], as a table
    shaped like `sync.global_score_table`'s ("head", "kv_group", "ffn": per layer; "hidden"),
    identical on every rank. A head's consumer is linear_proj (its d input columns), a KV
    group's the same for all its heads, an FFN channel's linear_fc2; a hidden channel's are
    every linear_qkv and linear_fc1 and an untied output layer, its factor the ratio of the
    errors summed over them. A consumer without usable Hessian data counts as uncompensated
    (factor 1; for hidden, left out). A collective over the world: call on every rank."""
    keys = sorted(window.consumers, key=str)
    owners = sync.reduce_hessians_to_owners(window, keys)
    me = sync.data_parallel_rank()
    owned = lambda key: key in owners and owners[key] == me

    def errors(key: Key, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return removal_errors(window.consumers[key].weight, window.hessians[key], columns, damping)

    device = groups.layers[0].qkv.device
    zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=device)
    heads = [zeros(w.num_attention_heads) for w in arch.layers]
    kv_groups = [zeros(w.num_query_groups) for w in arch.layers]
    ffn = [zeros(w.ffn_hidden_size) for w in arch.layers]
    hidden_before, hidden_after = zeros(arch.hidden_size), zeros(arch.hidden_size)
    every_column = torch.arange(arch.hidden_size, device=device)[:, None]
    for local in groups.layers:
        l, lay = local.layer, local.layout
        proj, fc2 = (l, "linear_proj"), (l, "linear_fc2")
        heads_here, groups_here = local.global_heads, local.global_kv_groups
        if owned(proj):
            group_cols = torch.stack([local.head_proj_cols[[h - heads_here.start for h in lay.heads_of_group(g)]].reshape(-1)
                                      for g in groups_here])
            heads[l][heads_here.start:heads_here.stop] = _fraction_left(errors(proj, local.head_proj_cols), len(heads_here), device)
            kv_groups[l][groups_here.start:groups_here.stop] = _fraction_left(errors(proj, group_cols), len(groups_here), device)
        if owned(fc2):
            channels = local.global_ffn
            ffn[l][channels.start:channels.stop] = _fraction_left(errors(fc2, local.ffn_fc2_cols[:, None]), len(channels), device)
    for key in keys:
        if key[1] in ("linear_qkv", "linear_fc1", "output_layer") and owned(key):
            found = errors(key, every_column)
            if found is not None:
                hidden_before.add_(found[0])
                hidden_after.add_(found[1])
    pieces = [*heads, *kv_groups, *ffn, hidden_before, hidden_after]
    flat = sync.sum_everywhere(torch.cat(pieces)).cpu()  # cpu-ok: a few floats per group, for the host's selection
    parts = list(flat.split([t.numel() for t in pieces]))
    n = arch.num_layers
    hidden = _ratio(parts[3 * n], parts[3 * n + 1])
    return {"head": parts[:n], "kv_group": parts[n:2 * n], "ffn": parts[2 * n:3 * n], "hidden": hidden}


def _fraction_left(found: tuple[torch.Tensor, torch.Tensor] | None, n: int, device: torch.device) -> torch.Tensor:
    """after / before per group; 1 (no repair) without Hessian data or without any error."""
    return torch.ones(n, dtype=torch.float64, device=device) if found is None else _ratio(*found)


def _ratio(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return torch.where(before > 0, after / before.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(before))
