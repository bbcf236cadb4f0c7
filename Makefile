# The two commands a new user runs on a fresh clone:
#   make test   set up .venv (torch 2.13.0 CPU unless a torch is already importable there),
#               install minqr with its extension and test extras, run the tests
#   make demo   the same set-up, then the offline demo: train a scalar and a quantile reward
#               model on the synthetic task, score its held-out pairs, write the report
# A second run reuses .venv and only reinstalls when setup.py or csrc/ changed.
#   make bench  the speed benchmarks (pytest benchmarks/)
#   make study  the paper's whole study, on a machine that can download GPT-2 and HH-RLHF

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.minqr-installed
# The torch installed into .venv when none is importable there. On this project's machines pip
# finds the CPU build of 2.13.0 on disk; elsewhere PyPI's torch comes with CUDA, and
# `make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"` gets the CPU build.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

DEMO := runs/demo
STUDY := runs/study

.PHONY: test demo bench study clean

test: $(INSTALLED)
	$(PY) -m pytest tests

demo: $(INSTALLED)
	$(PY) tools/train.py --demo --head scalar --out $(DEMO)/scalar
	$(PY) tools/train.py --demo --head quantile --out $(DEMO)/quantile
	$(PY) tools/score.py --model $(DEMO)/scalar --data $(DEMO)/demo-data/test.jsonl --out $(DEMO)/scalar.npz
	$(PY) tools/score.py --model $(DEMO)/quantile --data $(DEMO)/demo-data/test.jsonl --out $(DEMO)/quantile.npz
	$(PY) tools/analyze.py $(DEMO)/scalar.npz $(DEMO)/quantile.npz --out $(DEMO)/report

# Train both heads on helpful-base and harmless-base (GPT-2 124M, one epoch each), score the test
# splits and analyse: the paper's Table 1 and figures in $(STUDY)/report. See README for the cost.
study: $(INSTALLED)
	set -e; for subset in helpful-base harmless-base; do for head in scalar quantile; do \
	  $(PY) tools/train.py --head $$head --data hh-rlhf:$$subset --out $(STUDY)/$$subset-$$head; \
	  $(PY) tools/score.py --model $(STUDY)/$$subset-$$head --data hh-rlhf:$$subset --split test \
	    --out $(STUDY)/$$subset-$$head.npz; \
	done; done
	$(PY) tools/analyze.py $(STUDY)/*-scalar.npz $(STUDY)/*-quantile.npz --out $(STUDY)/report

bench: $(INSTALLED)
	$(PY) -m pytest benchmarks

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja numpy

$(INSTALLED): $(PY) setup.py pyproject.toml $(wildcard csrc/* csrc/*/*)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_INDEX) $(TORCH)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info minqr/*.so
