# The two commands a new user runs on a fresh clone:
#   make test   set up .venv (torch 2.13.0 CPU unless a torch is already importable there),
#               install minqr with its extension and test extras, run the tests
#   make demo   the same set-up, then the offline demo
# A second run reuses .venv and only reinstalls when setup.py or csrc/ changed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.minqr-installed

.PHONY: test demo bench clean

test: $(INSTALLED)
	$(PY) -m pytest tests

demo: $(INSTALLED)
	$(PY) tools/demo.py

bench: $(INSTALLED)
	$(PY) -m pytest benchmarks

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja

$(INSTALLED): $(PY) setup.py pyproject.toml $(wildcard csrc/*)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info minqr/*.so
