"""Check a run config against the launch before any rank starts, and say where the run writes.

    python launch/resolve_config.py [--shell] CONFIG WORLD_SIZE [--set KEY=VALUE ...]

Loads CONFIG with the overrides exactly as `efficientllm train` will and validates the layout at
WORLD_SIZE ranks (TP x PP must divide it, the global batch must split over DP). Prints the
layout; with --shell, prints `run_dir=`, `save_dir=` and `layout=` as shell assignments for the
launch scripts to eval. Any problem: one line on stderr and exit 2, before any process starts.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from efficientllm.config import ConfigError, load_config

EXIT_USER_ERROR = 2


def _fail(message: str) -> int:
    print(f"efficientllm: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="resolve_config", add_help=False)
    parser.add_argument("--shell", action="store_true")
    parser.add_argument("config")
    parser.add_argument("world_size")
    parser.add_argument("--set", action="append", default=[])
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        return _fail(f"unknown training argument(s) {' '.join(unknown)}: only --set KEY=VALUE is accepted")
    try:
        world = int(args.world_size)
    except ValueError:
        return _fail(f"world size {args.world_size!r} is not an integer")
    if world < 1:
        return _fail(f"world size must be >= 1, got {world}")
    try:
        config = load_config(args.config, args.set)
        p = config.parallel
        ranks = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if ranks > world:
            raise ConfigError(
                f"the config asks for tensor_model_parallel_size x pipeline_model_parallel_size = "
                f"{p.tensor_model_parallel_size}x{p.pipeline_model_parallel_size} = {ranks} ranks, "
                f"but the launch has WORLD_SIZE {world}"
            )
        config.validate(world)
    except ConfigError as err:
        return _fail(str(err))
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    layout = f"world {world} = TP {tp} x PP {pp} x DP {world // (tp * pp)}"
    if not args.shell:
        print(f"layout: {layout}")
        return 0
    save_dir = config.checkpoint.save or f"{config.run_dir.rstrip('/')}/checkpoints"
    for name, value in (("run_dir", config.run_dir), ("save_dir", save_dir), ("layout", layout)):
        print(f"{name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
