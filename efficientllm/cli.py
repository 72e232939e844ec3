"""The command line: `efficientllm train | preprocess | inspect | import | export | eval | report`.

Every user error (config, data, checkpoint, launch environment) is printed as one line on
stderr with exit code 2, before any process group is formed where that is possible. A training
run that stops early with a checkpoint written (SIGTERM/SIGUSR1, training.exit_interval,
training.exit_duration_in_mins) exits with 75: resume it with checkpoint.load.
"""

from __future__ import annotations

import argparse
import sys
import warnings

EXIT_USER_ERROR = 2


def _train(args: argparse.Namespace) -> int:
    from efficientllm import distributed
    from efficientllm.config import load_config
    from efficientllm.training.trainer import Trainer

    config = load_config(args.config, args.set)
    launch = distributed.read_launch_env()
    trainer = Trainer(config, launch)
    try:
        trainer.setup()
        trainer.train()
        trainer.finish()
    finally:
        trainer.close()
    return trainer.exit_code


def _preprocess(args: argparse.Namespace) -> int:
    from efficientllm.data.preprocess import preprocess_files
    from efficientllm.training.checkpoint import load_tokenizer_from

    tokenizer = load_tokenizer_from(args.tokenizer)
    record = preprocess_files(args.input, tokenizer, args.output_prefix, json_key=args.json_key)
    print(record)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from efficientllm import inspect

    return inspect.main(args.checkpoint, args.json)


def _report(args: argparse.Namespace) -> int:
    from efficientllm.reporting.report import write_report

    print(f"report: {write_report(args.run_dir, args.compare, args.output)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="efficientllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="pruning-aware pretraining (default: the shipped job)")
    train.add_argument("--config", help="YAML run config (default: the shipped default.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set training.lr=3e-4 (repeatable)")
    train.set_defaults(func=_train)

    pre = sub.add_parser("preprocess", help="tokenize text/JSONL into megatron .bin/.idx")
    pre.add_argument("--input", nargs="+", required=True, help="text or .jsonl files")
    pre.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                     help="a sentencepiece .model, a Hugging Face tokenizer directory or a checkpoint")
    pre.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    pre.add_argument("--json-key", default="text", help="JSONL field holding the text")
    pre.set_defaults(func=_preprocess)

    ins = sub.add_parser("inspect", help="show a checkpoint's architecture, iteration and tokens")
    ins.add_argument("checkpoint", help="a save directory (its latest checkpoint) or one iter_N directory")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.set_defaults(func=_inspect)

    from efficientllm.evaluation import commands as eval_commands
    from efficientllm.interop import commands as interop_commands

    eval_commands.add_parser(sub)
    interop_commands.add_parsers(sub)

    rep = sub.add_parser("report", help="a run's Markdown report with figures (loss, bits per byte, "
                                        "parameters, pruning, widths, evals)")
    rep.add_argument("run_dir", help="a run directory (with metrics.jsonl)")
    rep.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR", help="runs overlaid on the same axes")
    rep.add_argument("--output", help="report directory (default: RUN_DIR/report)")
    rep.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", module="megatron")
    from efficientllm.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"efficientllm: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
