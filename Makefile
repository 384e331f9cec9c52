# Set-up is part of every target: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv clean

run: $(STAMP)
	$(BIN)/luigi --module tasks RunAll --local-scheduler $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

# Rebuilt whenever the dependencies change. The version check runs first, so a wrong Python
# stops set-up before anything is created.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; this project needs Python 3.11 (TensorFlow 2.15 supports 3.9-3.11). Set PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v[:2] == (3, 11) else f"error: {sys.executable} is Python {v.major}.{v.minor}; this project needs Python 3.11 because TensorFlow 2.15, the last release with tf.estimator, has no wheels for newer Pythons. Set PYTHON=/path/to/python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf data/raw data/tfrecords results
