# `make demo` and `make test` are all a new machine needs: each creates .venv if missing and
# installs the pinned versions (constraints.txt) before running.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# DeepSpeed's accelerator: cuda where nvidia-smi answers, else cpu. An empty value (unset, or
# exported empty by an older shell) is replaced, because DeepSpeed rejects an empty DS_ACCELERATOR.
ifeq ($(strip $(DS_ACCELERATOR)),)
DS_ACCELERATOR := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
endif
export DS_ACCELERATOR
export PYTHONWARNINGS ?= ignore::FutureWarning
# DeepSpeed JIT-builds its CPU comm op at start; a per-checkout cache keeps a stale lock left by
# another environment's interrupted build from stalling every DeepSpeed start-up here.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions

.PHONY: demo demo-ft demo-ft-faults test test-fast venv lint clean print-accelerator gpu-check

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/codistill-ds train --config examples/tiny_cpu.yaml --nproc 4 --run-dir runs/demo
	$(VENV)/bin/codistill-ds plot runs/demo

demo-ft: $(STAMP)
	launch/demo_ft.sh runs/demo-ft

# The same two jobs; group 1 is SIGKILLed partway and restarted with --resume while group 0 trains
# on: runs/demo-ft-faults/timeline.png draws both groups' steps against time, with peers and the marks.
demo-ft-faults: $(STAMP)
	$(PY) -m benchmarks.faults.demo --out runs/demo-ft-faults

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

# For iterating: the unit tests (tests/unit: one process, no launch), ~1 min.
# `make test` runs everything: tests/unit and tests/dist (real ranks, real launchers).
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check codistill_ds tests benchmarks examples

print-accelerator:
	@echo DS_ACCELERATOR=$(DS_ACCELERATOR)

# GPU machines only (not part of `make test`): its own venv with a CUDA torch (constraints-gpu.txt),
# then a 2-group bf16 ZeRO-3/FSDP2 job with async exchange and checkpoint + resume, one line per check.
gpu-check:
	launch/gpu_check.sh

clean:
	rm -rf runs build *.egg-info .pytest_cache
