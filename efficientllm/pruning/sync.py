"""The collectives of pruning: statistics are reduced only when a decision is taken.

- `global_score_table(acc)`: every group's score of every kind, layer and shard, identical on
  every rank, in the form `selection.select` consumes. One all-reduce of a flat fp64 vector
  over the world (each rank fills the slots it owns, zeros elsewhere), then a broadcast from
  rank 0 so that every rank holds the same bits:
  * head / kv_group / ffn: written by their owner TP rank on their PP stage, divided by the
    DP size (the DP average);
  * hidden: partial sums from every TP rank and PP stage (norms only from TP rank 0, where they
    are replicated), divided by the DP size; taylor takes |·| of the global signed sum;
  * layer: the mean over TP (sequence-parallel ranks see different tokens) and DP.
- `reduce_hessians_over_dp(collector)`: H summed over DP (Σ XᵀX over the global batch), and over
  TP for the hidden-side consumers under sequence parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from efficientllm.pruning.hessian import HessianCollector
from efficientllm.pruning.saliency import SaliencyAccumulator


def _slots(arch):
    """Offsets of every group's slot in the flat table vector."""
    offsets, n = [], 0
    for w in arch.layers:
        head, n = n, n + w.num_attention_heads
        kv, n = n, n + w.num_query_groups
        ffn, n = n, n + w.ffn_hidden_size
        offsets.append((head, kv, ffn))
    hidden, n = n, n + arch.hidden_size
    layer, n = n, n + arch.num_layers
    return offsets, hidden, layer, n


def global_score_table(acc: SaliencyAccumulator, criterion: str | None = None) -> dict:
    """{"head": [per layer [nh]], "kv_group": [[ng]], "ffn": [[f]], "hidden": [h], "layer": [L]}
    (fp64), for the kinds `acc` scores; identical on every rank. Call on every rank."""
    criterion = criterion or acc.config.criterion
    if criterion not in ("fisher", "taylor"):
        raise ValueError(f"unknown saliency criterion {criterion!r}; valid: fisher, taylor")
    arch, groups = acc.arch, acc.groups
    dp = parallel_state.get_data_parallel_world_size()
    tp = groups.tp_size
    offsets, hidden_at, layer_at, total = _slots(arch)
    flat = torch.zeros(total, dtype=torch.float64)
    for local in groups.layers:
        s = acc.stats[local.layer]
        head, kv, ffn = offsets[local.layer]
        heads, kvs, ffns = local.global_heads, local.global_kv_groups, local.global_ffn
        flat[head + heads.start: head + heads.stop] = s[f"head_{criterion}"] / dp
        flat[kv + kvs.start: kv + kvs.stop] = s[f"kv_group_{criterion}"] / dp
        flat[ffn + ffns.start: ffn + ffns.stop] = s[f"ffn_{criterion}"] / dp
        flat[layer_at + local.layer] = s["cos"] / (tp * dp)
    hidden = acc.hidden_fisher if criterion == "fisher" else acc.hidden_taylor
    flat[hidden_at: hidden_at + arch.hidden_size] = hidden / dp
    dist.all_reduce(flat)
    dist.broadcast(flat, src=0)  # the same bits everywhere, whatever the reduction order
    if criterion == "taylor":
        flat[hidden_at: hidden_at + arch.hidden_size].abs_()
    table: dict = {}
    if "head" in acc.kinds:
        table["head"] = [flat[o[0]: o[0] + w.num_attention_heads].clone() for o, w in zip(offsets, arch.layers)]
        table["kv_group"] = [flat[o[1]: o[1] + w.num_query_groups].clone() for o, w in zip(offsets, arch.layers)]
    if "ffn" in acc.kinds:
        table["ffn"] = [flat[o[2]: o[2] + w.ffn_hidden_size].clone() for o, w in zip(offsets, arch.layers)]
    if "hidden" in acc.kinds:
        table["hidden"] = flat[hidden_at: hidden_at + arch.hidden_size].clone()
    if "layer" in acc.kinds:
        table["layer"] = flat[layer_at: layer_at + arch.num_layers].clone()
    return table


def reduce_hessians_over_dp(collector: HessianCollector) -> None:
    """Sum every local Hessian over DP (and over TP where sequence parallelism split the
    tokens). Call on every rank; consumers are visited in the same order on DP replicas."""
    dp_group = parallel_state.get_data_parallel_group()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for name in sorted(collector.consumers):
        h = collector.hessians.get(name)
        if h is None:
            size = _input_size(collector, name)
            h = collector.hessians[name] = torch.zeros(size, size)
        tokens = torch.tensor([float(collector.tokens.get(name, 0))], dtype=torch.float64)
        for group, applies in ((dp_group, True), (tp_group, name in collector.partial_over_tp)):
            if applies and dist.get_world_size(group) > 1:
                dist.all_reduce(h, group=group)
                dist.all_reduce(tokens, group=group)
        collector.tokens[name] = int(tokens.item())


def _input_size(collector: HessianCollector, name: str) -> int:
    module = collector.consumers[name]
    weight = getattr(module, "weight", None)
    if weight is None:  # a tied output layer without its own weight: the hidden size
        return module.config.hidden_size
    return weight.shape[1]
