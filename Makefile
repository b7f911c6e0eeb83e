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

.PHONY: setup lab test demo notebooks exercises lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "tfcourse needs Python >= 3.10, found " + sys.version.split()[0] + " (set PYTHON=python3.X)")'
	@echo "==> creating $(VENV) and installing tfcourse with its dependencies (about 30 s)"
	@$(PYTHON) -m venv $(VENV) || { echo "could not create a venv: on Debian/Ubuntu install python3-venv"; exit 1; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=. $(ROOT_FLAG) $(LAB_ARGS) notebooks/00_setup.ipynb

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(NBVAL) tests notebooks solutions $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/mpiexec -n 4 $(BIN)/python -m mpi4py -m tfcourse.hello
	$(BIN)/mpiexec -n 4 $(BIN)/python -m mpi4py -m tfcourse.parallel.data_parallel \
		--config tiny --steps 100 --allreduce ring

notebooks: $(STAMP)
	$(BIN)/python -m tfcourse.nbtools execute notebooks/*.ipynb solutions/*.ipynb

exercises: $(STAMP)
	$(BIN)/python -m tfcourse.nbtools exercises

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
