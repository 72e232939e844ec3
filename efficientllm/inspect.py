"""`efficientllm inspect CKPT_DIR [--json]`: what a checkpoint holds, without loading its shards.

Reads only the checkpoint's metadata (efficientllm.json), after checking its manifest: the
Architecture layer by layer, parameter count, iteration, consumed tokens, pruning progress and
the layout it was saved at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from efficientllm.architecture import Architecture
from efficientllm.training import checkpoint


def describe(path: str | Path) -> dict[str, Any]:
    """A JSON-able description of the checkpoint at `path` (a save directory or an iter_N)."""
    found = checkpoint.find_checkpoint(path)
    if found is None:
        raise checkpoint.CheckpointError(f"no checkpoint in {path}")
    meta = checkpoint.verify(found)
    arch = Architecture.from_dict(meta["architecture"])
    architecture = arch.to_dict()
    architecture["num_layers"] = arch.num_layers
    for layer, widths in zip(architecture["layers"], arch.layers):
        layer["num_parameters"] = arch.layer_parameters(widths)
    return {
        "checkpoint": str(found),
        "iteration": meta["iteration"],
        "consumed_samples": meta["consumed_samples"],
        "consumed_tokens": meta["consumed_tokens"],
        "num_parameters": arch.num_parameters(),
        "architecture": architecture,
        "parallel": meta["parallel"],
        "pruning": _pruning(meta),
        "saved_at": meta.get("saved_at"),
    }


def _pruning(meta: dict[str, Any]) -> dict[str, Any]:
    prune = meta["config"].get("prune", {})
    info: dict[str, Any] = {"enabled": bool(prune.get("enabled"))}
    if info["enabled"]:
        start, end, it = prune["start_step"], prune["end_step"], meta["iteration"]
        info.update(
            target_params=prune.get("target_params"),
            target_ratio=prune.get("target_ratio"),
            start_step=start,
            end_step=end,
            phase="before" if it < start else "pruning" if it < end else "done",
            fraction_of_phase_done=min(1.0, max(0.0, (it - start) / max(1, end - start))),
        )
    info.update(meta.get("extra", {}))  # what the pruning state reports about itself
    return info


def format_text(d: dict[str, Any]) -> str:
    a = d["architecture"]
    p = d["parallel"]
    lines = [
        f"checkpoint {d['checkpoint']}",
        f"iteration {d['iteration']:,}, consumed {d['consumed_tokens']:,} tokens ({d['consumed_samples']:,} samples)",
        f"saved at TP{p['tensor_model_parallel_size']} PP{p['pipeline_model_parallel_size']} "
        f"DP{p['data_parallel_size']} (world {p['world_size']}"
        f"{', distributed optimizer' if p.get('use_distributed_optimizer') else ''})",
        f"{'layer':>5} {'heads':>6} {'kv':>4} {'ffn':>7} {'params':>12}",
    ]
    for i, l in enumerate(a["layers"]):
        lines.append(f"{i:>5} {l['num_attention_heads']:>6} {l['num_query_groups']:>4} "
                     f"{l['ffn_hidden_size']:>7} {l['num_parameters']:>12,}")
    lines.append(f"hidden {a['hidden_size']}, head_dim {a['head_dim']}, vocab {a['vocab_size']}, "
                 f"total {d['num_parameters']:,} parameters")
    pruning = d["pruning"]
    if pruning["enabled"] or len(pruning) > 1:
        rest = ", ".join(f"{k} {v}" for k, v in pruning.items() if k != "enabled")
        lines.append(f"pruning: {rest}")
    return "\n".join(lines)


def main(path: str, as_json: bool) -> int:
    d = describe(path)
    print(json.dumps(d, indent=1) if as_json else format_text(d))
    return 0
