# Two commands do everything on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first, on its own, so that no CUDA build is pulled in on a
# CPU machine (a bare `torch` requirement would fetch a multi-GB CUDA wheel).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench bench-quick clean megatron-lm data

venv: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -e '.[test,search,megatron-lm,data]'
	@touch $(STAMP)

# Megatron-LM's sources at core_v0.16.1 for the tests that run its pretrain_vlm.py /
# pretrain_gpt.py: MEGATRON_LM_DIR names a checkout of your own; otherwise the tests use
# build/megatron-lm, unpacked from ../shared/third_party (see its README).
MEGATRON_LM_TARBALL ?= ../shared/third_party/megatron-lm-core_v0.16.1.git.tar.gz
MEGATRON_LM_BUILD := build/megatron-lm

megatron-lm: $(MEGATRON_LM_BUILD)/.ready

$(MEGATRON_LM_BUILD)/.ready:
	@if [ -n "$$MEGATRON_LM_DIR" ]; then echo "Megatron-LM: $$MEGATRON_LM_DIR (MEGATRON_LM_DIR)"; \
	elif [ -f $(MEGATRON_LM_TARBALL) ]; then \
	  rm -rf $(MEGATRON_LM_BUILD) && mkdir -p $(MEGATRON_LM_BUILD) && \
	  tar -xzf $(MEGATRON_LM_TARBALL) -C $(MEGATRON_LM_BUILD) && \
	  git -C $(MEGATRON_LM_BUILD) checkout -q -f core_v0.16.1 && touch $@; \
	else echo "Megatron-LM: set MEGATRON_LM_DIR to a checkout at core_v0.16.1" \
	  "(or provide $(MEGATRON_LM_TARBALL))" >&2; exit 2; fi

# A small real dataset (pipeweaver_megatron/data/demo.py): scikit-image's photographs and
# pydoc's text as captioning and interleaved Energon datasets, plus a local BPE tokenizer.
DATA_BUILD := build/data

data: $(DATA_BUILD)/.ready

$(DATA_BUILD)/.ready: $(STAMP)
	rm -rf $(DATA_BUILD)
	$(VENV)/bin/pipeweaver data demo --out $(DATA_BUILD)
	@touch $@

demo: venv data
	$(VENV)/bin/pipeweaver demo --data-path $(DATA_BUILD)/interleaved \
	  --tokenizer-model $(DATA_BUILD)/tokenizer

test: venv megatron-lm
	$(PY) -m pytest -q tests
	$(MAKE) bench-quick

# The planning side alone (IR, SEMU, planner, workload; no torch processes): seconds.
test-fast: venv
	$(PY) -m pytest -q -m fast tests

# The evaluation (benchmarks/run_all.py): every table and plot of docs/results, simulated
# by SEMU and measured on this CPU. bench-quick is a smoke run (minutes) into build/.
bench: venv
	$(PY) benchmarks/run_all.py

bench-quick: venv
	$(PY) benchmarks/run_all.py --quick --out build/bench-quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
