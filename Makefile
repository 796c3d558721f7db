# CPUShare: `make demo` runs a whole market locally, `make test` runs every
# test, `make check` the fast ones (test/unit and the import rules, not the
# tests marked slow, the fuzzer at CHECK_FUZZ cases a target), `make bench`
# runs the benchmarks, `make fuzz` runs the fuzzer's long profile (over
# 100,000 cases).  Each sets itself up first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Fuzz cases a target in `make check`; `make test` runs a few hundred each.
CHECK_FUZZ ?= 100

.PHONY: all demo test check fuzz bench setup clean

all: test

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml tools/host-deps.sh
	bash tools/host-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test,tpm]' --config-settings editable_mode=compat
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m cpushare.client.demo

# The Debian packages are checked again on every run: the browser and VM
# tests fail, never skip, without theirs.  TEST_WORKERS processes run the
# tests (pytest-xdist): the VM and browser tests one after the other in one
# of them, the rest beside them (test/conftest.py); TEST_WORKERS=0 runs all
# in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	bash tools/host-deps.sh
	$(PY) -m pytest test -n $(TEST_WORKERS) --dist loadgroup --durations=30 $(PYTEST_ARGS)

check: $(STAMP)
	CPUSHARE_FUZZ=$(CHECK_FUZZ) $(PY) -m pytest test/unit test/test_architecture.py \
		-m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)

fuzz: $(STAMP)
	CPUSHARE_FUZZ=1 $(PY) -m pytest test/unit/test_fuzz.py -p no:cacheprovider \
		--hypothesis-show-statistics $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/market.py $(MARKET_BENCH_ARGS)
	$(PY) bench/flood.py $(FLOOD_BENCH_ARGS)
	@if [ "$$(id -u)" = 0 ]; then $(PY) bench/vms.py $(VM_BENCH_ARGS); \
	else echo "bench/vms.py skipped: it needs root (a TAP device, the cpushare-vm user)"; fi
	$(PY) bench/verdicts.py $(VERDICT_BENCH_ARGS)
	$(PY) bench/attest.py $(ATTEST_BENCH_ARGS)
	$(PY) bench/mesh.py $(MESH_BENCH_ARGS)
	@if [ "$$(id -u)" = 0 ]; then $(PY) bench/paths.py $(PATHS_BENCH_ARGS); \
	else echo "bench/paths.py skipped: it needs root (the sellers' VM user)"; fi
	@if [ "$$(id -u)" = 0 ]; then $(PY) bench/natmatrix.py $(NAT_BENCH_ARGS); \
	else echo "bench/natmatrix.py skipped: it needs root (network namespaces, iptables)"; fi
	$(PY) bench/site.py $(SITE_BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info demo-run
