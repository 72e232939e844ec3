"""Worker: the training worker (workers/train.py), with every optimizer surgery under megatron's
DistributedOptimizer checked against an independent gather of the old state.

Usage: python tests/distributed/workers/prune_distopt.py OUT_DIR CONFIG [KEY=VALUE ...]
Besides OUT_DIR/rank{R}.json writes OUT_DIR/surgery{R}.json: per event, how many new parameter
shards this rank owns and how many of them had main param, exp_avg, exp_avg_sq bit-identical to
the surviving slice of the old state, and a step of their own equal to the old step.
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

from efficientllm.pruning import surgery  # noqa: E402
from tests.distributed.workers import train  # noqa: E402

CHECKS: list[dict] = []
ORIGINAL = surgery.slice_optimizer_state


def _leaves(optimizer):
    return [l for l in surgery._leaf_optimizers(optimizer) if not getattr(l, "is_stub_optimizer", False)]


def _owned(optimizer) -> dict:
    """id(model param) -> (leaf, Range in the flattened param), by megatron's own maps."""
    out = {}
    for leaf in _leaves(optimizer):
        assert "Distributed" in type(leaf).__name__, type(leaf).__name__
        for p in leaf.model_param_group_index_map:
            out[id(p)] = (leaf, leaf._get_model_param_range_map(p)["param"])
    return out


def checked_slice(old_optimizer, old_model, new_optimizer, new_model, plan, old_arch):
    slices = surgery.param_slices(old_model, new_model, plan, old_arch)
    owned = _owned(old_optimizer)
    # Reference: each rank's owned shards by megatron's accessor, assembled with all_gather_object.
    mine = {}
    for i, s in enumerate(slices):
        if id(s.old) in owned:
            leaf, r = owned[id(s.old)]
            tensors = leaf._get_main_param_and_optimizer_states(s.old)
            mine[i] = (r.start, r.end, {k: v.detach().clone() for k, v in tensors.items()})
    gathered = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(gathered, mine, group=parallel_state.get_data_parallel_group())
    full = {}
    for i, s in enumerate(slices):
        parts = [g[i] for g in gathered if i in g]
        assert sum(e - b for b, e, _ in parts) == s.old.numel(), s.name  # the ranges tile the param
        full[i] = {}
        for key in ("param", "exp_avg", "exp_avg_sq"):
            flat = torch.empty(s.old.numel())
            for b, e, t in parts:
                flat[b:e] = t[key].view(-1)
            full[i][key] = s.take(flat.view(s.old.shape)).reshape(-1)
        full[i]["step"] = {float(t["step"]) for _, _, t in parts}
        assert len(full[i]["step"]) == 1, full[i]["step"]

    moved = ORIGINAL(old_optimizer, old_model, new_optimizer, new_model, plan, old_arch)

    new_owned = _owned(new_optimizer)
    record = {"owned": 0, "identical": 0, "moved": moved}
    steps = []
    for i, s in enumerate(slices):
        if id(s.new) not in new_owned:
            continue
        leaf, r = new_owned[id(s.new)]
        record["owned"] += 1
        tensors = leaf._get_main_param_and_optimizer_states(s.new)
        ok = all(torch.equal(tensors[k].view(-1), full[i][k][r.start:r.end]) for k in ("exp_avg", "exp_avg_sq"))
        # main params: sliced, except a compensated consumer, which restarts from its new weight
        expected_main = full[i]["param"]
        if s.cols is not None and s.consumer is not None and not torch.equal(expected_main.view(s.new.shape), s.new.detach()):
            expected_main = s.new.detach().reshape(-1)
        ok = ok and torch.equal(tensors["param"].view(-1), expected_main[r.start:r.end])
        ok = ok and {float(tensors["step"])} == full[i]["step"]
        steps.append(tensors["step"])
        record["identical"] += int(ok)
    record["shared_steps"] = len(steps) - len({id(t) for t in steps})
    CHECKS.append(record)
    return moved


def main() -> None:
    surgery.slice_optimizer_state = checked_slice  # PruningPass imports it at each event
    train.main()
    Path(sys.argv[1], f"surgery{os.environ['RANK']}.json").write_text(json.dumps(CHECKS))


if __name__ == "__main__":
    main()
