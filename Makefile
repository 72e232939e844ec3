# `make run`: install what is missing into .venv, then the default pruning-aware job on the CPU
# (one process, one thread per core; nproc itself honours OMP_NUM_THREADS, hence env -u).
# `make test`: install, then the test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1

.PHONY: install run test bench clean example-smollm2

install: $(STAMP)

$(STAMP): setup.py
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: EfficientLLM needs Python 3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so pip takes the CPU wheel and never a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: install
	OMP_NUM_THREADS=$$(env -u OMP_NUM_THREADS nproc) $(VENV)/bin/efficientllm train

test: install
	$(PY) -m pytest -q tests

# The worked example: SmolLM2-135M imported, pruned under PAP at TP2, exported to Hugging Face.
example-smollm2: install
	launch/example_smollm2.sh

# gpu_check.py is the driver of bench/gpu_check.sh (one GPU), not a CPU benchmark.
bench: install
	for script in $(filter-out bench/gpu_check.py,$(wildcard bench/*.py)); do $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) runs
