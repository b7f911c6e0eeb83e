# tfcourse: `make lab` opens the course, `make test` runs every test. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
# The venv's mpiexec and python come first, in every recipe and in the notebooks it starts.
export PATH := $(BIN):$(PATH)
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)
LAB_ARGS ?=
PYTEST_ARGS ?=
NBVAL := --nbval --nbval-current-env --nbval-cell-timeout=120 --sanitize-with tests/nbval_sanitize.cfg

.PHONY: setup lab test check demo notebooks exercises lint clean browser-deps

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "tfcourse needs Python >= 3.10, found " + sys.version.split()[0] + " (set PYTHON=python3.X)")'
	@echo "==> creating $(VENV) and installing tfcourse with its dependencies (about 30 s)"
	@$(PYTHON) -m venv $(VENV) || { echo "could not create a venv: on Debian/Ubuntu install python3-venv"; exit 1; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

lab: $(STAMP)
	$(BYTECODE)
	$(BIN)/jupyter lab --notebook-dir=. $(ROOT_FLAG) $(LAB_ARGS) notebooks/00_setup.ipynb

# Bytecode for the course's own modules: where PYTHONDONTWRITEBYTECODE is set (these machines),
# every kernel and MPI rank would otherwise recompile them at import (~70 ms each, measured).
BYTECODE = $(BIN)/python -m compileall -q tfcourse

test: $(STAMP) browser-deps
	$(BIN)/ruff check .
	$(BYTECODE)
	$(BIN)/python -m pytest $(NBVAL) tests notebooks solutions $(PYTEST_ARGS)

# The inner loop (about a minute): lint, every unit test, and one real mpiexec job.
check: $(STAMP)
	$(BIN)/ruff check .
	$(BYTECODE)
	$(BIN)/python -m pytest -q -m "smoke or not (mpi or slow or browser)" tests $(PYTEST_ARGS)

# The browser tests drive Debian's chromium (never a downloaded browser). Install it where we
# can (root + apt-get); otherwise say loudly that those tests will be skipped, not passed.
browser-deps:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "==> installing Debian's chromium for the browser tests (about 15 s)"; \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && \
		  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } || \
		echo "!!! could not install chromium: the browser tests will be SKIPPED, not run"; \
	else \
		echo "!!! chromium not found, and not installable here (needs root and apt-get):"; \
		echo "!!! tests/test_browser.py will be SKIPPED, not run. Install chromium to run it."; \
	fi

demo: $(STAMP)
	$(BIN)/mpiexec -n 4 $(BIN)/python -m mpi4py -m tfcourse.hello
	$(BIN)/mpiexec -n 4 $(BIN)/python -m mpi4py -m tfcourse.parallel.data_parallel \
		--config tiny --steps 100 --allreduce ring

notebooks: $(STAMP)
	$(BIN)/python -m tfcourse.course.nbtools execute notebooks/*.ipynb solutions/*.ipynb

exercises: $(STAMP)
	$(BIN)/python -m tfcourse.course.nbtools exercises

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
