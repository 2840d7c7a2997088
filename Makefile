# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use and install the exact
# versions in constraints.txt, so two fresh machines run the same suite. `make test-oldest` runs the same suite at the
# oldest versions pyproject.toml admits (constraints-oldest.txt); .ci/run runs both.
PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints.txt
BIN         := $(VENV)/bin
PIP         := $(BIN)/pip install -q -c $(CONSTRAINTS)

.PHONY: install demo test test-oldest bench bench-compare clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The registry's standard torch (a CUDA build that also runs on CPUs; what timm's torchvision pairs with), then
# mae_fast in editable mode without build isolation so the optional C++ extension compiles against that torch, then
# EFAAR's relationship databases (CORUM, HuMAP, Reactome, SIGNOR, StringDB) as data files, without the package's
# heavy dependencies (mae_fast reads its files and never imports it).
$(VENV)/.installed: setup.py pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) torch torchvision
	$(PIP) --no-build-isolation -e ".[test,dali,eval]"
	$(PIP) --no-deps efaar-benchmarking
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mae-fast demo

# Two pytest-xdist workers, tests handed out one at a time (most are single-threaded Python: the Triton interpreter,
# small models): about half the wall time of one process on CI's 2 cores. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist load tests

# The oldest leg runs in a copy of this tree (committed files plus uncommitted changes to them) with its own venv:
# the C++ extension is built in place, and one tree cannot hold builds for two torch versions.
OLDEST := build/oldest
test-oldest:
	rm -rf $(OLDEST)/src && mkdir -p $(OLDEST)/src
	rev=$$(git stash create); git archive $${rev:-HEAD} | tar -x -C $(OLDEST)/src
	rm -f $(OLDEST)/venv/.installed
	$(MAKE) -C $(OLDEST)/src test VENV=$(abspath $(OLDEST))/venv CONSTRAINTS=constraints-oldest.txt \
		TEST_WORKERS=$(TEST_WORKERS)

# The pytest-benchmark suites (benchmarks/bench_*.py; options: benchmarks/conftest.py, e.g.
# BENCH_ARGS="--bench-device cpu --bench-rounds 10"). `make bench` saves pytest-benchmark's JSON, with the machine,
# GPU, driver, torch, Triton and commit, under .benchmarks/<machine>/NNNN_*.json; `make bench-compare` runs the
# suites again and compares them with a saved run (BENCH_BASELINE: its number, e.g. 0001; default the latest),
# failing when a median is more than BENCH_THRESHOLD slower. The test suite runs every suite once at toy sizes
# with --benchmark-disable (tests/integration/test_bench_suites.py).
BENCH_SUITES    ?= benchmarks/bench_*.py
BENCH_ARGS      ?=
BENCH_THRESHOLD ?= 10%
BENCH_BASELINE  ?=
bench: install
	$(BIN)/python -m pytest -q $(BENCH_SUITES) --benchmark-only --benchmark-autosave $(BENCH_ARGS)

bench-compare: install
	$(BIN)/python -m pytest -q $(BENCH_SUITES) --benchmark-only \
		$(if $(BENCH_BASELINE),--benchmark-compare=$(BENCH_BASELINE),--benchmark-compare) \
		--benchmark-compare-fail=median:$(BENCH_THRESHOLD) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info mae_fast/*.so demo_out
