"""The command line: `efficientllm train | preprocess | inspect`.

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
    from efficientllm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer_model)
    record = preprocess_files(args.input, tokenizer, args.output_prefix, json_key=args.json_key)
    print(record)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from efficientllm import inspect

    return inspect.main(args.checkpoint, args.json)


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
    pre.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file")
    pre.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    pre.add_argument("--json-key", default="text", help="JSONL field holding the text")
    pre.set_defaults(func=_preprocess)

    ins = sub.add_parser("inspect", help="show a checkpoint's architecture, iteration and tokens")
    ins.add_argument("checkpoint", help="a save directory (its latest checkpoint) or one iter_N directory")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.set_defaults(func=_inspect)
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
