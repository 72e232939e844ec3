"""`efficientllm eval ppl | mc | lm-eval`: argument parsing and running, behind the CLI.

A model is one of our checkpoints (a save directory or one iter_N) or a Hugging Face directory
(it has config.json). A checkpoint runs at the launched TP/PP (`--tp/--pp`, world size a
multiple of TP x PP; the remaining ranks split the work as data-parallel replicas); a Hugging
Face directory runs in one process. Every input is checked before a model is built.

Results are printed on rank 0 and written as JSON (atomically) to `--output`, by default into
`RUN_DIR/eval/` when the checkpoint lies in a run directory (one with metrics.jsonl), where
`efficientllm report` finds them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator

from efficientllm.atomic import write_atomically
from efficientllm.evaluation import EvaluationError
from efficientllm.reporting.run import EVAL_DIR


def _add_model_args(parser: argparse.ArgumentParser, ours: bool = True) -> None:
    """The model flags; `ours`: also those only our backends read (lm-eval takes the export's
    own tokenizer and runs in one process)."""
    parser.add_argument("model", help="a checkpoint (save directory or iter_N) or a Hugging Face directory")
    if ours:
        parser.add_argument("--tokenizer", help="tokenizer to use instead of the model's own")
    parser.add_argument("--max-length", type=int, help="tokens per forward pass (default: the checkpoint's "
                                                       "seq_length, or the Hugging Face config's context length)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run a Hugging Face directory's own modelling code")
    parser.add_argument("--output", help="write the results as JSON here (default: RUN_DIR/eval/ for a "
                                         "checkpoint of a run directory)")
    if ours:
        parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1,
                            help="tensor parallel size for a checkpoint (launch with torchrun)")
        parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1,
                            help="pipeline parallel size for a checkpoint (launch with torchrun)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `eval` and its three commands on the CLI's subparsers."""
    from efficientllm.evaluation.tasks import PAPER_TASKS

    evaluate = sub.add_parser("eval", help="bits per byte, zero-shot multiple choice, lm-eval on the export")
    commands = evaluate.add_subparsers(dest="eval_command", required=True)

    ppl = commands.add_parser("ppl", help="rolling-window log-likelihood: bits per byte, token/word perplexity")
    _add_model_args(ppl)
    source = ppl.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", nargs="+", metavar="FILE", help="plain-text files (one document each) or "
                                                                  ".jsonl files (one document a line)")
    source.add_argument("--data", metavar="PREFIX", help="a megatron indexed dataset PREFIX.bin/.idx")
    ppl.add_argument("--json-key", default="text", help="JSONL field holding the text (default text)")
    ppl.set_defaults(func=run_ppl)

    mc = commands.add_parser("mc", help="zero-shot multiple choice: acc and acc_norm as lm-eval computes them")
    _add_model_args(mc)
    mc.add_argument("--tasks", default=",".join(PAPER_TASKS),
                    help="comma-separated shipped tasks and/or .jsonl task files (default: the paper's seven)")
    mc.add_argument("--limit", type=int, help="only the first N items of each task")
    mc.set_defaults(func=run_mc)

    harness = commands.add_parser("lm-eval", help="export to Hugging Face and run lm-eval itself, offline, "
                                                  "on the same local data")
    _add_model_args(harness, ours=False)
    harness.add_argument("--tasks", default=",".join(PAPER_TASKS), help="as for `eval mc`")
    harness.add_argument("--limit", type=int, help="only the first N items of each task")
    harness.add_argument("--text", nargs="+", metavar="FILE", help="also measure bits per byte on these files")
    harness.add_argument("--json-key", default="text", help="JSONL field holding the text (default text)")
    harness.add_argument("--export-dir", help="keep the Hugging Face export here (default: a temporary directory)")
    harness.set_defaults(func=run_lm_eval)


def _check_counts(args: argparse.Namespace) -> None:
    for name in ("max_length", "batch_size", "limit", "tp", "pp"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise EvaluationError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


# ----- the model --------------------------------------------------------------------------------
@contextlib.contextmanager
def _model(args: argparse.Namespace) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(model, description): a Hugging Face directory in this one process, or a checkpoint at
    the launched layout (checked against the world size and the checkpoint before any process
    group is formed), with its process groups for the duration."""
    from efficientllm import distributed
    from efficientllm.evaluation.lm import is_hf_directory

    path = Path(args.model)
    launch = distributed.read_launch_env()
    if is_hf_directory(path):
        if launch.world_size > 1 or args.tp > 1 or args.pp > 1:
            raise EvaluationError(f"{path} is a Hugging Face directory, evaluated in one process: run it without "
                                  f"torchrun and --tp/--pp")
        from efficientllm.evaluation.hf_lm import HFCausalLM

        yield (HFCausalLM(path, tokenizer=args.tokenizer, max_length=args.max_length, batch_size=args.batch_size,
                          trust_remote_code=args.trust_remote_code),
               {"model": str(path.resolve()), "backend": "transformers"})
        return

    from efficientllm.evaluation.megatron_lm import MegatronLM, resolve_checkpoint

    if launch.world_size % (args.tp * args.pp):
        raise distributed.LaunchError(f"world size {launch.world_size} is not divisible by --tp {args.tp} x "
                                      f"--pp {args.pp}")
    resolved = resolve_checkpoint(path, args.tp, args.pp)
    with distributed.process_groups(launch, args.tp, args.pp, seed=0):
        lm = MegatronLM.from_checkpoint(resolved, tokenizer=args.tokenizer, max_length=args.max_length,
                                        batch_size=args.batch_size)
        meta = resolved.meta
        yield lm, {
            "model": str(resolved.path.resolve()), "backend": "megatron",
            "layout": {"tp": args.tp, "pp": args.pp, "dp": launch.world_size // (args.tp * args.pp)},
            "iteration": meta["iteration"], "consumed_tokens": meta["consumed_tokens"],
            "num_parameters": resolved.arch.num_parameters(),
        }


def _is_logging_rank() -> bool:
    from efficientllm import distributed

    return distributed.is_logging_rank()


# ----- output -----------------------------------------------------------------------------------
def default_output(model: Path, kind: str) -> Path | None:
    """RUN_DIR/eval/<kind>-iter_N.json for a checkpoint in a run directory, else None."""
    from efficientllm.training import checkpoint

    try:
        found = checkpoint.find_checkpoint(model)
    except checkpoint.CheckpointError:
        return None
    if found is None:
        return None
    run_dir = found.parent.parent
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    return run_dir / EVAL_DIR / f"{kind}-{found.name}.json"


def write_json(path: Path, record: dict[str, Any]) -> Path:
    return write_atomically(path, json.dumps(record, indent=1, default=str) + "\n")


def _finish(args: argparse.Namespace, kind: str, record: dict[str, Any], table: str) -> int:
    if not _is_logging_rank():
        return 0
    record = {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}
    print(table)
    output = Path(args.output) if args.output else default_output(Path(args.model), kind)
    if output is not None:
        print(f"results: {write_json(output, record)}")
    return 0


def task_table(tasks: dict[str, dict[str, Any]]) -> str:
    rows = [f"{'task':<16} {'split':<11} {'items':>6} {'acc':>7} {'acc_norm':>9}"]
    for name, r in tasks.items():
        rows.append(f"{name:<16} {r['split']:<11} {r['items']:>6} {r['acc']:>7.4f} {r['acc_norm']:>9.4f}")
    if len(tasks) > 1:
        mean = lambda key: sum(r[key] for r in tasks.values()) / len(tasks)
        rows.append(f"{f'mean of {len(tasks)}':<16} {'':<11} {'':>6} {mean('acc'):>7.4f} {mean('acc_norm'):>9.4f}")
    return "\n".join(rows)


def perplexity_table(p: dict[str, Any]) -> str:
    return (f"{p['documents']} documents, {p['tokens']:,} tokens, {p['bytes']:,} bytes, max_length {p['max_length']}\n"
            f"bits per byte {p['bits_per_byte']:.4f} | token perplexity {p['token_perplexity']:.3f} | "
            f"word perplexity {p['word_perplexity']:.3f} | byte perplexity {p['byte_perplexity']:.4f}")


# ----- the commands -----------------------------------------------------------------------------
def run_ppl(args: argparse.Namespace) -> int:
    from efficientllm.data.indexed import check_prefix
    from efficientllm.evaluation.documents import read_indexed, read_text_files
    from efficientllm.evaluation.perplexity import evaluate_perplexity

    _check_counts(args)
    # The input is checked before the model is built; stored tokens are decoded by its tokenizer.
    documents = None if args.data else read_text_files(args.text, args.json_key)
    if args.data:
        check_prefix(args.data)
    with _model(args) as (lm, about):
        if documents is None:
            documents = read_indexed(args.data, lm.tokenizer.eod, lm.tokenizer.detokenize)
        result = evaluate_perplexity(lm, documents).summary()
        result["source"] = {"data": args.data} if args.data else {"text": [str(Path(t).resolve()) for t in args.text]}
        return _finish(args, "ppl", {**about, "perplexity": result}, perplexity_table(result))


def _load_tasks(text: str, limit: int | None):
    from efficientllm.evaluation.tasks import load_task, parse_task_list

    return [load_task(name, limit) for name in parse_task_list(text)]


def run_mc(args: argparse.Namespace) -> int:
    from efficientllm.evaluation.multiple_choice import evaluate_task

    _check_counts(args)
    tasks = _load_tasks(args.tasks, args.limit)
    with _model(args) as (lm, about):
        results = {t.name: evaluate_task(lm, t, args.limit).summary() for t in tasks}
        record = {**about, "max_length": lm.max_length, "limit": args.limit, "tasks": results}
        return _finish(args, "mc", record, task_table(results))


def run_lm_eval(args: argparse.Namespace) -> int:
    import tempfile

    from efficientllm.evaluation.documents import read_text_files
    from efficientllm.evaluation.lm import is_hf_directory
    from efficientllm.evaluation.lm_eval_runner import run_lm_eval as harness

    _check_counts(args)
    tasks = _load_tasks(args.tasks, args.limit)
    documents = read_text_files(args.text, args.json_key) if args.text else None
    path = Path(args.model)
    about: dict[str, Any] = {"model": str(path.resolve()), "backend": "lm-eval"}
    max_length = args.max_length
    with tempfile.TemporaryDirectory(prefix="efficientllm-export-") as tmp:
        if is_hf_directory(path):
            hf_dir = path
        else:
            from efficientllm.evaluation.megatron_lm import resolve_checkpoint
            from efficientllm.interop.hf_export import export_hf

            resolved = resolve_checkpoint(path)
            max_length = max_length or resolved.meta["seq_length"]  # what `eval ppl` defaults to
            # Padded to a plain LlamaForCausalLM: lm-eval loads it without remote code.
            hf_dir = export_hf(resolved.path, Path(args.export_dir or Path(tmp) / "hf"), padded=True)
            about.update(checkpoint=str(resolved.path.resolve()), export=str(hf_dir), iteration=resolved.meta["iteration"],
                         num_parameters=resolved.arch.num_parameters())
        raw = harness(hf_dir, tasks, documents=documents, limit=args.limit, max_length=max_length,
                      batch_size=args.batch_size, trust_remote_code=args.trust_remote_code)
    results = {t.name: {"split": t.split, "source": str(t.source), "items": raw["tasks"][t.name]["items"],
                        "acc": raw["tasks"][t.name]["acc"], "acc_norm": raw["tasks"][t.name]["acc_norm"]}
               for t in tasks}
    record = {**about, "lm_eval_version": raw["lm_eval_version"], "max_length": max_length, "limit": args.limit,
              "tasks": results}
    table = task_table(results)
    if "perplexity" in raw:
        p = raw["perplexity"]
        record["perplexity"] = {k: v for k, v in p.items() if k != "per_document"}
        table += (f"\n{p['documents']} documents: bits per byte {p['bits_per_byte']:.4f} | word perplexity "
                  f"{p['word_perplexity']:.3f} | byte perplexity {p['byte_perplexity']:.4f}")
    return _finish(args, "lm-eval", record, table)
