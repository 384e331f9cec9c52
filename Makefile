# Set-up is part of every target: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The central scheduler: loopback only, since luigid has no authentication. Its pidfile, logs
# and saved state live in $(SCHEDULER_DIR).
SCHEDULER_DIR ?= .luigid
SCHEDULER_PORT ?= 8082
TENSORBOARD_PORT ?= 6006

.PHONY: run test test-busy venv clean ui ui-stop tensorboard crash-trials bench bench-photos

run: ui
	$(BIN)/luigi --module tasks RunAll --scheduler-host 127.0.0.1 --scheduler-port $(SCHEDULER_PORT) $(ARGS)
	@echo "Scheduler UI: http://127.0.0.1:$(SCHEDULER_PORT)   leaderboard: results/leaderboard.html   curves: make tensorboard"

ui: $(STAMP)
	@$(BIN)/python -m tasks.services start --state-dir $(SCHEDULER_DIR) --port $(SCHEDULER_PORT)

ui-stop: $(STAMP)
	@$(BIN)/python -m tasks.services stop --state-dir $(SCHEDULER_DIR)

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir results --host 127.0.0.1 --port $(TENSORBOARD_PORT)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite with BUSY_HOGS CPU-bound processes beside it, as on a newcomer's busy machine: it
# must pass there too. The hogs end with the suite, however it ends.
BUSY_HOGS ?= 2
test-busy: $(STAMP)
	@hogs=""; for i in $$(seq $(BUSY_HOGS)); do $(BIN)/python -c 'while True: pass' & hogs="$$hogs $$!"; done; \
	trap 'kill $$hogs' EXIT; echo "running the suite beside $(BUSY_HOGS) CPU-bound processes ($$hogs)"; \
	$(BIN)/python -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

# Every benchmark prints its ratios against a baseline measured in the same run; see bench/RESULTS.md.
# The photo benchmark (bench/photos.py, 20,000 generated photos) takes hours on 2 cores, so it runs
# only with BENCH_PHOTOS=1 (after the others) or alone with `make bench-photos`; it prints its estimate first.
BENCHMARKS := noop train predict convert index lineage scaleout $(if $(filter 1,$(BENCH_PHOTOS)),photos)
bench: $(STAMP)
	@nproc | xargs echo "cores:"; free -g | awk '/Mem:/ {print "memory: " $$2 " GiB"}'
	@mkdir -p build/bench
	@for name in $(BENCHMARKS); do \
		echo "== bench/$$name.py (log: build/bench/$$name.log)"; \
		TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python bench/$$name.py 2> build/bench/$$name.log || { tail -30 build/bench/$$name.log; exit 1; }; \
	done

bench-photos: $(STAMP)
	@$(MAKE) --no-print-directory bench BENCHMARKS=photos

# 50 SIGKILL trials, 5 inside each stage with local roots and 5 with S3 roots; `make test` runs one of each.
crash-trials: $(STAMP)
	CRASH_TRIALS=5 $(BIN)/python -m pytest -s tests/test_crashes.py $(PYTEST_ARGS)

# Rebuilt whenever the dependencies change. The version check runs first, so a wrong Python
# stops set-up before anything is created.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; this project needs Python 3.11, the one version its pinned dependencies are tested on. Set PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v[:2] == (3, 11) else f"error: {sys.executable} is Python {v.major}.{v.minor}; this project needs Python 3.11, the one version its pinned dependencies are tested on (TensorFlow 2.15, the last release with tf.estimator, has no wheels past 3.11). Set PYTHON=/path/to/python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf data/raw data/tfrecords results
