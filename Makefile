# `make demo` and `make test` work on a fresh machine with nothing but Python:
# they create .venv if absent, install the package with its dev extra, then run.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first so that a machine-specific build can be chosen here
# (setup.cfg only has a lower bound). Override: make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.t2i-align-installed

.PHONY: test demo toy-results install clean-venv

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m ruff check --quiet .
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m t2i_align.toy demo --out runs/demo --overwrite

# The toy-world method results quoted in README: offline DPO on best-vs-worst-of-8 pairs, RAFT and online DPO,
# each judged against the base on the 60 held-out prompts x 8 seeds (sample/compare.py), RAFT and online DPO also
# at seeds none of their rounds drew.
# About 75 minutes on 2 cores.
toy-results: $(STAMP)
	$(BIN)/python -m t2i_align.toy pairs --out runs/toy-pairs-k8 --k 8 --seed 1 --pairing best-worst --overwrite
	$(BIN)/python train/train.py --config configs/toy/dpo.yaml data.path=runs/toy-pairs-k8/pairs.parquet \
		train.max_steps=600 output_dir=runs/toy-dpo-k8-600
	$(BIN)/python train/train.py --config configs/toy/raft.yaml
	$(BIN)/python train/train.py --config configs/toy/online_dpo.yaml
	for run in toy-dpo-k8-600 toy-raft toy-online-dpo; do \
		$(BIN)/python sample/compare.py --lora runs/$$run/final --seeds-per-prompt 8 --out runs/$$run/compare.json --overwrite \
			|| exit 1; done
	$(BIN)/python sample/compare.py --lora runs/toy-raft/final --seeds-per-prompt 8 --seed 100000 --overwrite \
		--out runs/toy-raft/compare_seed100000.json
	# 100000 shares 360 of its 480 noises with RAFT's round 0 (K = 16); 1000000 none: the fresh test
	$(BIN)/python sample/compare.py --lora runs/toy-raft/final --seeds-per-prompt 8 --seed 1000000 --overwrite \
		--out runs/toy-raft/compare_seed1000000.json
	# online DPO's round r draws from seed + 1,000,003 r: 1000000 shares 456 noises with its round 1; 10^9 none
	$(BIN)/python sample/compare.py --lora runs/toy-online-dpo/final --seeds-per-prompt 8 --seed 1000000000 \
		--overwrite --out runs/toy-online-dpo/compare_seed1000000000.json

clean-venv:
	rm -rf $(VENV)
