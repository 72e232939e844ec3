"""What a run directory holds, read once for the report: the records of metrics.jsonl, the final
Architecture, the source Architecture (from the newest checkpoint's config), and every
evaluation result (in-training `eval` records and the JSON files `efficientllm eval` wrote)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficientllm.architecture import Architecture
from efficientllm.data import DataError
from efficientllm.data.jsonl import json_lines

EVAL_DIR = "eval"  # where `efficientllm eval` writes its results for a run's checkpoints


@dataclass
class RunData:
    name: str
    path: Path
    records: dict[str, list[dict[str, Any]]]  # kind -> records, in file order
    final: Architecture | None
    source: Architecture | None
    eval_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name -> result

    def series(self, kind: str, key: str) -> tuple[list[float], list[float]]:
        """(tokens, values) of `key` over the records of `kind` that have it."""
        points = [(self.tokens_at(r), r[key]) for r in self.records.get(kind, []) if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    @property
    def tokens_per_step(self) -> float | None:
        for record in self.records.get("train", []):
            if record.get("tokens") and record.get("step"):
                return record["tokens"] / record["step"]
        return None

    def tokens_at(self, record: dict[str, Any]) -> float:
        if record.get("tokens") is not None:
            return record["tokens"]
        per_step = self.tokens_per_step
        return record["step"] * per_step if per_step else float("nan")


def read_run(path: str | Path) -> RunData:
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise DataError(f"{path} is not a run directory: {metrics} not found")
    records: dict[str, list[dict[str, Any]]] = {}
    for _, record in json_lines(metrics):
        records.setdefault(record.get("kind", "?"), []).append(record)
    final_path = path / "architecture.json"
    final = Architecture.from_json(final_path.read_text()) if final_path.is_file() else None
    eval_dir = path / EVAL_DIR
    eval_files = {p.name: json.loads(p.read_text()) for p in sorted(eval_dir.glob("*.json"))} if eval_dir.is_dir() else {}
    return RunData(path.name, path, records, final, _source_architecture(path, final), eval_files)


def _source_architecture(path: Path, final: Architecture | None) -> Architecture | None:
    """The configured (unpruned) model of the run, from the config its newest checkpoint stores."""
    from efficientllm.errors import USER_ERRORS
    from efficientllm.training import checkpoint

    try:
        found = checkpoint.find_checkpoint(path / "checkpoints")
        if found is None or final is None:
            return None
        meta = checkpoint.read_meta(found)
        from efficientllm.architecture import architecture_from_config
        from efficientllm.config import config_from_dict

        return architecture_from_config(config_from_dict(meta["config"]), final.vocab_size)
    except (*USER_ERRORS, KeyError):  # an old or foreign checkpoint: the report goes on without it
        return None
