"""`efficientllm import hf ...` and `efficientllm export hf ...`: the command groups of the two
ends. Each format is one sub-command of its group (`export gguf` sits beside `export hf`)."""

from __future__ import annotations

import argparse


def _import_hf(args: argparse.Namespace) -> int:
    from efficientllm.interop.hf_import import import_hf

    out = import_hf(args.hf_dir, args.out_ckpt, tp=args.tp, pp=args.pp, pad_to_tp=args.pad_to_tp)
    print(f"imported {args.hf_dir} -> {out} (iteration 0; train from it with model.from_hf or checkpoint.load)")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from efficientllm.interop.hf_export import describe, export_hf

    print(describe(export_hf(args.checkpoint, args.out_dir, padded=args.padded)))
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from efficientllm.interop.gguf_export import describe_gguf, export_checkpoint_gguf

    print(describe_gguf(export_checkpoint_gguf(args.checkpoint, args.out_gguf, dtype=args.dtype)))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the `import` and `export` groups to the CLI; returns export's format sub-parsers."""
    imp = sub.add_parser("import", help="a model from another format into one of our checkpoints")
    formats = imp.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="a Hugging Face Llama-family directory (safetensors + tokenizer.json)")
    hf.add_argument("hf_dir", help="directory with config.json, model.safetensors (or an index) and a tokenizer")
    hf.add_argument("out_ckpt", help="new save directory for the checkpoint (iter_0000000)")
    hf.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks that read and write it")
    hf.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks that read and write it")
    hf.add_argument("--pad-to-tp", action="store_true",
                    help="add all-zero KV groups / FFN channels where a width does not divide --tp (exact)")
    hf.set_defaults(func=_import_hf)

    exp = sub.add_parser("export", help="a checkpoint (saved at any TP/PP) to another format")
    formats = exp.add_subparsers(dest="format", required=True)
    hf = formats.add_parser("hf", help="a Hugging Face directory transformers loads")
    hf.add_argument("checkpoint", help="a save directory (its latest checkpoint) or one iter_N directory")
    hf.add_argument("out_dir", help="new output directory")
    hf.add_argument("--padded", action="store_true",
                    help="per-layer widths zero-padded to a plain LlamaForCausalLM (no remote code; same logits)")
    hf.set_defaults(func=_export_hf)
    gguf = formats.add_parser("gguf", help="one GGUF file for llama.cpp (per-layer widths as architecture deci)")
    gguf.add_argument("checkpoint", help="a save directory (its latest checkpoint) or one iter_N directory")
    gguf.add_argument("out_gguf", help="the .gguf file to write (replaced atomically if it exists)")
    gguf.add_argument("--dtype", default="f32", help="f32 (exact), f16, or q8_0 (8-bit blocks of 32)")
    gguf.set_defaults(func=_export_gguf)
    return formats
