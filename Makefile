# The two commands a new user runs on a fresh clone:
#   make test   set up .venv (torch 2.13.0 CPU unless a torch is already importable there),
#               install minqr with its extension and test extras, run the tests but the slow ones
#   make demo   the same set-up, then the offline demo: train a scalar and a quantile reward
#               model on the synthetic task, score its held-out pairs, write the report
# A second run reuses .venv and only reinstalls when setup.py or csrc/ changed.
#   make test-slow  the slow tests (marked @pytest.mark.slow: end-to-end runs, simulations), as CI does
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
OBJECTIVES := runs/objectives
# the real pairs in ../shared/data: the objectives study runs on them too where they are
HH_PAIRS := ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz
GPT2_TOKENIZER := ../shared/data/gpt2-tokenizer

.PHONY: test test-slow demo bench study objectives best-of-n clean

test: $(INSTALLED)
	$(PY) -m pytest tests -m "not slow"

test-slow: $(INSTALLED)
	$(PY) -m pytest tests -m slow

# (--overwrite: a second `make demo` replaces the first's runs, as the target's own outputs)
demo: $(INSTALLED)
	$(PY) tools/train.py --demo --head scalar --overwrite --out $(DEMO)/scalar
	$(PY) tools/train.py --demo --head quantile --overwrite --out $(DEMO)/quantile
	$(PY) tools/score.py --overwrite --model $(DEMO)/scalar --data $(DEMO)/demo-data/test.jsonl --out $(DEMO)/scalar.npz
	$(PY) tools/score.py --overwrite --model $(DEMO)/quantile --data $(DEMO)/demo-data/test.jsonl --out $(DEMO)/quantile.npz
	$(PY) tools/analyze.py $(DEMO)/scalar.npz $(DEMO)/quantile.npz --overwrite --out $(DEMO)/report

# Train the scalar head, the paper's quantile head and the mixture head on helpful-base and
# harmless-base (GPT-2 124M, one epoch each), score the test splits and analyse: the paper's Table 1
# and figures in $(STUDY)/report. See docs/guide.md#study for the cost.
study: $(INSTALLED)
	set -e; for subset in helpful-base harmless-base; do for head in scalar paper mixture; do \
	  case $$head in scalar) options="--head scalar";; *) options="--objective $$head";; esac; \
	  $(PY) tools/train.py --overwrite $$options --data hh-rlhf:$$subset --out $(STUDY)/$$subset-$$head; \
	  $(PY) tools/score.py --overwrite --model $(STUDY)/$$subset-$$head --data hh-rlhf:$$subset --split test \
	    --out $(STUDY)/$$subset-$$head.npz; \
	done; done
	$(PY) tools/analyze.py $(STUDY)/*-scalar.npz $(STUDY)/*-paper.npz $(STUDY)/*-mixture.npz --overwrite --out $(STUDY)/report

# The study of the objectives (docs/objectives.md): on each variant of the synthetic task, each
# objective (the scalar head, paper, mixture, independent) trained with 3 seeds through train.py,
# score.py and analyze.py; the same objectives on 1,850 real HH-RLHF pairs (462 held out) where
# ../shared/data has them; then one table over all, runs/objectives/table.md (docs/objectives/ keeps
# the copy docs/objectives.md quotes). About an hour and a half on a 2-core CPU.
objectives: $(INSTALLED)
	set -e; for variant in demo shifted; do \
	  $(PY) tools/synthetic.py --variant $$variant --overwrite --out $(OBJECTIVES)/$$variant/task; \
	  for seed in 0 1 2; do for objective in scalar paper mixture independent; do \
	    case $$objective in scalar) head="--head scalar";; *) head="--objective $$objective";; esac; \
	    $(PY) tools/train.py --overwrite --demo $$head --data $(OBJECTIVES)/$$variant/task/train.jsonl --seed $$seed \
	      --out $(OBJECTIVES)/$$variant/$$objective-$$seed; \
	    $(PY) tools/score.py --overwrite --model $(OBJECTIVES)/$$variant/$$objective-$$seed \
	      --data $(OBJECTIVES)/$$variant/task/test.jsonl --workload $$variant --label "$$objective seed $$seed" \
	      --out $(OBJECTIVES)/$$variant/$$objective-$$seed.npz; \
	  done; done; \
	  $(PY) tools/analyze.py $(OBJECTIVES)/$$variant/*.npz --overwrite --out $(OBJECTIVES)/$$variant/report; \
	done
	set -e; if [ -f $(HH_PAIRS) ]; then \
	  mkdir -p $(OBJECTIVES)/hh; \
	  zcat $(HH_PAIRS) | head -n 1850 > $(OBJECTIVES)/hh/train.jsonl; \
	  zcat $(HH_PAIRS) | tail -n +1851 > $(OBJECTIVES)/hh/test.jsonl; \
	  $(PY) -c "import torch, minqr; torch.manual_seed(0); minqr.save_gpt2(minqr.GPT2(minqr.GPT2Config(n_layer=4, \
	    n_embd=256, n_head=4, n_positions=256)), '$(OBJECTIVES)/hh/model')"; \
	  for objective in scalar paper mixture independent; do \
	    case $$objective in scalar) head="--head scalar";; *) head="--objective $$objective";; esac; \
	    $(PY) tools/train.py $$head --model $(OBJECTIVES)/hh/model --tokenizer $(GPT2_TOKENIZER) \
	      --data $(OBJECTIVES)/hh/train.jsonl --eval-data $(OBJECTIVES)/hh/test.jsonl --max-length 256 --epochs 2 \
	      --lr 1e-3 --batch-size 16 --overwrite --out $(OBJECTIVES)/hh/$$objective; \
	    $(PY) tools/score.py --overwrite --model $(OBJECTIVES)/hh/$$objective --data $(OBJECTIVES)/hh/test.jsonl \
	      --workload "harmless-base held-out 462" --label $$objective --out $(OBJECTIVES)/hh/$$objective.npz; \
	  done; \
	  $(PY) tools/analyze.py $(OBJECTIVES)/hh/*.npz --overwrite --out $(OBJECTIVES)/hh/report; \
	fi
	$(PY) tools/objectives_table.py $(OBJECTIVES)/*/report/summaries.json --overwrite --out $(OBJECTIVES)/table.md

# The best-of-N evidence (docs/best_of_n.md): on the demo and shifted tasks, a mixture model and a
# scalar head (one seed each), candidate sets (1,000 prompts of 8), their choices by each statistic
# against the oracle that knows the true distribution; the table in $(BEST_OF_N)/table.md. About
# ten minutes on a 2-core CPU.
BEST_OF_N := runs/best-of-n
best-of-n: $(INSTALLED)
	set -e; for variant in demo shifted; do \
	  $(PY) tools/synthetic.py --variant $$variant --overwrite --out $(BEST_OF_N)/$$variant/task; \
	  $(PY) tools/candidates.py --variant $$variant --overwrite --out $(BEST_OF_N)/$$variant/candidates; \
	  for head in mixture scalar; do \
	    case $$head in scalar) options="--head scalar";; *) options="--objective mixture";; esac; \
	    $(PY) tools/train.py --demo $$options --data $(BEST_OF_N)/$$variant/task/train.jsonl --overwrite \
	      --out $(BEST_OF_N)/$$variant/$$head; \
	  done; \
	done
	$(PY) tools/best_of_n_table.py $(BEST_OF_N) --overwrite --out $(BEST_OF_N)/table.md

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
