#!/usr/bin/env bash
# The GPU path in one short run on ONE GPU (NCCL, bf16 with fp32 main params): the pruning-aware
# job with events, a checkpoint in the pruning phase and a resume from it, the rebuild for the
# continued pretraining (Transformer Engine layers where TE is importable); then tokens/s and MFU
# of a dense ~360M-parameter model at bf16, our loop beside a bare megatron-core loop. Every
# step is checked (bench/gpu_check.py says what); exit status 0 only when all passed. Meant to
# finish within 8 minutes on one H200 (each step has its own time limit).
#
#   bench/gpu_check.sh                              # on the GPU machine
#   GPU_CHECK_CPU_REHEARSAL=1 bench/gpu_check.sh    # the same steps on the CPU: gloo, fp32, tiny
#
# Needs CUDA torch, megatron-core==0.16.1 and this package's dependencies (the Dockerfile image,
# or `pip install --no-deps -e .` plus them). PYTHON picks the interpreter (default: .venv's,
# else python3); GPU_CHECK_DIR where it writes (default runs/gpu_check, emptied first).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PYTHON=$here/.venv/bin/python; else PYTHON=python3; fi
fi
out=${GPU_CHECK_DIR:-$here/runs/gpu_check}
rm -rf "$out" && mkdir -p "$out"
export GPU_CHECK_DIR=$out PYTHONUNBUFFERED=1
# One thread per rank on a shared CPU; a GPU rank needs only a few for the host side.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$([ "${GPU_CHECK_CPU_REHEARSAL:-0}" = 1 ] && echo 1 || echo 4)}
exec "$PYTHON" "$here/bench/gpu_check.py"
