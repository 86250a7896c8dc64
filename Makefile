# A newcomer needs two commands:
#   make demo   sets up .venv (pinned torch, the package built in place) and runs the demos
#   make test   sets up .venv, runs the test suite, then builds the wheel from the sdist,
#               installs it into a fresh venv and smoke-tests it there (what CI runs)
# Other targets: see `make help`.
SHELL       := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# the second torch of `make test-torch2` (a CUDA build from this machine's disk)
TORCH2 ?= torch==2.14.1
# pytest arguments, e.g. make test PYTEST_ARGS="-k step -x"
PYTEST_ARGS ?=
CSRC   := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
PIP    := $(PY) -m pip --disable-pip-version-check
# pip prints one line per package fetched / installed; "WARNING: Location ... is ignored"
# lines (this machine's local index) are noise.
# prints "still working" every 30 s while a long step is silent (killed at the step's end)
HEARTBEAT = ( while sleep 30; do echo "    ... still working ($$(( $$(date +%s) - start )) s)"; done ) & hb=$$!; trap "kill $$hb 2>/dev/null" EXIT;
QUIET_PIP := grep --line-buffered -v -E "^WARNING: Location|^Requirement already satisfied" || true

.PHONY: help setup demo test suite test-wheel test-packaging test-torch2 test-slow bench bench-smoke gpu-check-dry-run clean FORCE

help:
	@echo "make demo            set up .venv and run the demos"
	@echo "make test            suite + wheel smoke test in a fresh venv (what CI runs)"
	@echo "make suite           the pytest suite only"
	@echo "make test-wheel      sdist -> wheel -> fresh venv -> smoke test (no editable install)"
	@echo "make test-packaging  also pip install . / pip wheel <sdist> WITH build isolation (slow)"
	@echo "make test-torch2     the suite on $(TORCH2) (in a copy of the tree, .torch2-tree/)"
	@echo "make test-slow       long checks (-m slow)"
	@echo "make bench           CPU benchmarks (benchmarks/run.py; --save to write results)"
	@echo "make bench-smoke     every benchmark at tiny sizes (nothing written)"
	@echo "make gpu-check-dry-run   benchmarks/gpu_check.sh --dry-run on this CPU"
	@echo "variables: TORCH=$(TORCH) VENV=$(VENV) LEET_BUILD_CUDA=auto|0|1 PYTEST_ARGS=..."

$(PY):
	@echo "==> creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version))"
	$(PYTHON) -m venv $(VENV)

# The torch spec of the last install: rewritten (new mtime) only when TORCH changes, so
# that `make test TORCH=...` reinstalls torch and rebuilds instead of keeping the old one.
$(VENV)/.torch-spec: FORCE | $(PY)
	@if [ "$$(cat $@ 2>/dev/null)" != "$(TORCH)" ]; then \
		[ -f $@ ] && echo "==> torch spec changed: '$$(cat $@)' -> '$(TORCH)'"; \
		echo "$(TORCH)" > $@; fi

# Pinned torch (a CPU build from this machine's disk), Triton for the interpreter tests,
# and the build tools for --no-build-isolation.
$(VENV)/.deps: $(VENV)/.torch-spec | $(PY)
	@echo "==> [1/2] installing $(TORCH), triton, pytest, expecttest, matplotlib, einops, build tools, and"
	@echo "    torchscale (no deps: the public RetNet the pass tests read) into $(VENV)"
	@echo "    (torch is a large wheel: a minute or more; pip's progress follows)"
	@start=$$(date +%s); $(HEARTBEAT) \
	$(PIP) install --progress-bar off "$(TORCH)" triton numpy pytest expecttest matplotlib einops \
		"setuptools>=77" wheel ninja build 2>&1 | $(QUIET_PIP); \
	$(PIP) install --progress-bar off --no-deps torchscale==0.3.0 fairscale==0.4.0 2>&1 | $(QUIET_PIP); \
	$(PY) -c "import torch, sys; print('    torch', torch.__version__, '(CUDA ' + str(torch.version.cuda) + ')')"; \
	$(PY) - "$(TORCH)" <<< 'import sys, torch; spec = sys.argv[1]; want = spec.split("==", 1)[1] if "==" in spec else None; sys.exit(0 if want is None or torch.__version__.split("+")[0] == want.split("+")[0] else f"installed torch {torch.__version__} is not {spec}")'; \
	echo "    done in $$(( $$(date +%s) - start )) s"
	@touch $@

$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml build_backend/leet_build_backend.py $(CSRC)
	@echo "==> [2/2] building leet_compile in place (C++ operator library; 1-3 minutes on 2 cores,"
	@echo "    more with the CUDA kernels); compiler steps follow, full log in $(VENV)/build.log"
	@start=$$(date +%s); $(HEARTBEAT) \
	if $(PIP) install -v --no-build-isolation --no-deps -e . 2>&1 | tee $(VENV)/build.log \
		| { grep --line-buffered -E "^ *leet_compile build:|^ *\[[0-9]+/[0-9]+\] |^ *(g\+\+|c\+\+) .* -shared |error:" \
		| sed -u -E 's/^ *(\[[0-9]+\/[0-9]+\]) .* -c ([^ ]+) .*/    \1 compiled \2/; s/^ *(g|c)\+\+ .* -o ([^ ]+[.]so).*/    linked \2/; s/^ *leet_compile build:/    leet_compile build:/'; true; }; \
	then echo "    done in $$(( $$(date +%s) - start )) s"; \
	else echo "build failed; last lines of $(VENV)/build.log:"; tail -40 $(VENV)/build.log; exit 1; fi
	@touch $@

setup: $(VENV)/.built

demo: setup
	$(PY) examples/methods_demo.py
	$(PY) examples/retnet_lm.py

suite: setup
	@echo "==> test suite ($(TORCH), $$(nproc) cores)"
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The user's path, not editable: sdist -> wheel (no isolation, the venv's torch) -> a fresh
# venv with only torch and that wheel -> op + backend="leet" in a process that never
# imports leet_compile, run outside the source tree.
test-wheel: setup
	VENV=$(VENV) TORCH="$(TORCH)" bash .ci/wheel_smoke.sh

test: suite test-wheel

# Also the build-isolation paths (pip install . ; pip wheel <sdist>) in fresh venvs.
test-packaging: setup
	VENV=$(VENV) TORCH="$(TORCH)" bash .ci/wheel_smoke.sh --isolation

# The suite on a second torch (the CUDA build on this machine's disk: its CUDA kernels
# are compiled too, for sm_80/sm_90 since no GPU is visible), in a copy of this tree
# ($(TORCH2_TREE), refreshed from the working tree each time, mtimes kept) with its own
# venv: an editable build puts leet_compile/_C.abi3.so into the source tree, and one
# built against another torch would break .venv's.
TORCH2_TREE ?= .torch2-tree
test-torch2:
	@echo "==> copying the working tree to $(TORCH2_TREE) (tracked and untracked, not ignored)"
	@mkdir -p $(TORCH2_TREE)
	@git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xpf - -C $(TORCH2_TREE)
	$(MAKE) -C $(TORCH2_TREE) suite VENV=.venv TORCH="$(TORCH2)" PYTHON=$(PYTHON)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/run.py cpu methods decode

bench-smoke: setup
	$(PY) benchmarks/run.py all --smoke

gpu-check-dry-run: setup
	PYTHON=$(PY) bash benchmarks/gpu_check.sh --dry-run

clean:
	rm -rf $(VENV) .torch2-tree build dist *.egg-info leet_compile/_C*.so

FORCE:
