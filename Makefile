# `make demo` and `make test` work on a fresh machine with nothing but Python:
# they create .venv if absent, install the package with its dev extra, then run.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first so that a machine-specific build can be chosen here
# (setup.cfg only has a lower bound). Override: make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.t2i-align-installed

.PHONY: test demo install clean-venv

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m t2i_align.toy demo --out runs/demo

clean-venv:
	rm -rf $(VENV)
