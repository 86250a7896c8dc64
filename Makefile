# A newcomer needs two commands:
#   make demo   sets up .venv (pinned torch, the package built in place) and runs the demos
#   make test   sets up .venv and runs the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: setup demo test test-slow bench clean

$(PY):
	@echo "==> creating $(VENV)"
	$(PYTHON) -m venv $(VENV)

# Pinned torch (a CPU build from this machine's disk), Triton for the interpreter
# tests, and the build tools for --no-build-isolation.
$(VENV)/.deps: | $(PY)
	@echo "==> installing $(TORCH), triton, numpy, pytest, expecttest, matplotlib"
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)" triton numpy pytest expecttest \
		matplotlib "setuptools>=64" wheel ninja
	@touch $@

$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(CSRC)
	@echo "==> building leet_compile (C++ operator library; about a minute)"
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e .
	@touch $@

setup: $(VENV)/.built

demo: setup
	$(PY) examples/methods_demo.py
	$(PY) examples/retnet_lm.py

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	cd benchmarks && ../$(PY) bench_cpu.py && ../$(PY) bench_methods.py

clean:
	rm -rf $(VENV) build *.egg-info leet_compile/_C*.so
