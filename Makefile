# Two commands do everything on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first, on its own, so that no CUDA build is pulled in on a
# CPU machine (a bare `torch` requirement would fetch a multi-GB CUDA wheel).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench bench-quick clean

venv: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -e '.[test,search]'
	@touch $(STAMP)

demo: venv
	$(VENV)/bin/pipeweaver demo

test: venv
	$(PY) -m pytest -q tests
	$(MAKE) bench-quick

# The evaluation (benchmarks/run_all.py): every table and plot of docs/results, simulated
# by SEMU and measured on this CPU. bench-quick is a smoke run (minutes) into build/.
bench: venv
	$(PY) benchmarks/run_all.py

bench-quick: venv
	$(PY) benchmarks/run_all.py --quick --out build/bench-quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
