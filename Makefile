# The two commands: `make demo` and `make test`. Each creates .venv and installs the package
# into it when missing, so either one works as the first command on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch is pinned: the CPU wheel of this version lies on disk here; an unpinned torch would pull
# a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# test processes (pytest-xdist; a file's tests stay in one process, so its module fixtures are built once);
# TEST_WORKERS=1 runs the suite in this process, one test after another
TEST_WORKERS ?= 2

.PHONY: demo test test-slow install clean bench

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/reasonedit run configs/experiment/shapes_demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# the slow tier (tests marked slow: a wheel installed in a fresh venv, ...); CI runs `make test` only
test-slow: $(STAMP)
	$(PY) -m pytest -q --slow -m slow

bench: $(STAMP)
	$(PY) bench/synth.py

clean:
	rm -rf $(VENV) runs *.egg-info
