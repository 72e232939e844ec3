"""Worker: the training worker (workers/train.py), with every optimizer surgery under megatron's
DistributedOptimizer checked against an independent gather of the old and new state.

Usage: python tests/distributed/workers/prune_distopt.py OUT_DIR CONFIG [KEY=VALUE ...]
Besides OUT_DIR/rank{R}.json writes OUT_DIR/surgery{R}.json: per event, how many new parameter
shards this rank owns; how many of them got exp_avg, exp_avg_sq bit-identical to the surviving
slice of the old state and a step of their own equal to the old step, and a main param equal to
the new value surgery computes on the whole old tensor (an fp32 parameter: the new weight, bit
for bit; a low-precision one: from the old fp32 master, `identical` when bit for bit, `close`
within fp32 rounding where row blocks are compensated apart); and how many parameters' model
weights are the rounding of their new main params assembled over DP, and how many OBS-compensated
shards hold only part of their parameter (rows compensated apart from the rest).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer  # noqa: E402

from efficientllm.pruning.megatron import optimizer_state  # noqa: E402
from efficientllm.training import pruning  # noqa: E402
from tests.distributed.workers import train  # noqa: E402

CHECKS: list[dict] = []
ORIGINAL = optimizer_state.slice_optimizer_state
KEYS = ("param", "exp_avg", "exp_avg_sq")


def _owned(optimizer) -> dict:
    """id(model param) -> (leaf, Range in the flattened param), by megatron's own maps."""
    out = {}
    for leaf in optimizer_state.leaf_optimizers(optimizer):
        assert isinstance(leaf, DistributedOptimizer), type(leaf).__name__
        for p in leaf.model_param_group_index_map:
            out[id(p)] = (leaf, leaf._get_model_param_range_map(p)["param"])
    return out


def _assembled(optimizer, params: list[torch.Tensor]) -> list[dict]:
    """Per param: its whole main param and moments, from every DP rank's owned range by
    megatron's accessor (all_gather_object), and the set of their steps."""
    owned = _owned(optimizer)
    mine = {}
    for i, p in enumerate(params):
        if id(p) in owned:
            leaf, r = owned[id(p)]
            tensors = leaf._get_main_param_and_optimizer_states(p)
            mine[i] = (r.start, r.end, {k: v.detach().clone() for k, v in tensors.items() if k in KEYS or k == "step"})
    gathered = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(gathered, mine, group=parallel_state.get_data_parallel_group())
    out = []
    for i, p in enumerate(params):
        parts = [g[i] for g in gathered if i in g]
        assert sum(e - b for b, e, _ in parts) == p.numel()  # the ranges tile the param
        full = {}
        for key in KEYS:
            flat = torch.empty(p.numel())
            for b, e, t in parts:
                if key in t:
                    flat[b:e] = t[key].view(-1)
            full[key] = flat.view(p.shape)
        full["step"] = {float(t["step"]) for _, _, t in parts if "step" in t}
        out.append(full)
    return out


def checked_slice(old_optimizer, new_optimizer, pruned):
    slices = pruned.slices
    old = _assembled(old_optimizer, [s.old for s in slices])
    for full in old:
        assert len(full["step"]) == 1, full["step"]

    moved = ORIGINAL(old_optimizer, new_optimizer, pruned)

    new_owned = _owned(new_optimizer)
    new = _assembled(new_optimizer, [s.new for s in slices])
    record = {"owned": 0, "identical": 0, "close": 0, "rounded": 0, "params": len(slices), "moved": moved,
              "partial_compensated": 0}
    steps = []
    for i, s in enumerate(slices):
        record["rounded"] += int(torch.equal(s.new.detach(), new[i]["param"].to(s.new.dtype)))
        if id(s.new) not in new_owned:
            continue
        leaf, r = new_owned[id(s.new)]
        record["owned"] += 1
        record["partial_compensated"] += int(s.obs is not None and r.end - r.start < s.new.numel())
        tensors = leaf._get_main_param_and_optimizer_states(s.new)
        ok = all(torch.equal(tensors[k].view(-1), s.take(old[i][k]).reshape(-1)[r.start:r.end])
                 for k in ("exp_avg", "exp_avg_sq"))
        ok = ok and {float(tensors["step"])} == old[i]["step"]
        steps.append(tensors["step"])
        main = tensors["param"].view(-1)
        if s.old.dtype == torch.float32:  # its own main param: the new weight
            expected = s.new.detach().reshape(-1)[r.start:r.end]
        else:  # from the old fp32 master, on the whole tensor
            expected = s.take(old[i]["param"], corrected=True).reshape(-1)[r.start:r.end]
        if ok and torch.equal(main, expected):
            record["identical"] += 1
        elif ok and torch.allclose(main, expected, rtol=1e-6, atol=1e-7):
            record["close"] += 1
    record["shared_steps"] = len(steps) - len({id(t) for t in steps})
    CHECKS.append(record)
    return moved


def main() -> None:
    pruning.slice_optimizer_state = checked_slice  # the name the PruningPass calls
    train.main()
    Path(sys.argv[1], f"surgery{os.environ['RANK']}.json").write_text(json.dumps(CHECKS))


if __name__ == "__main__":
    main()
