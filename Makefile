# fastcompress: `make main` runs the main job (the demo), `make test` the test suite, `make
# bench` the benchmarks. Each first installs what it is missing (scripts/install_env.py:
# main < test < bench): an installed torch >= 2.4 is kept as it is; torch==2.13.0 (CPU)
# only where there is none.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install install-main install-bench main test checkstyle format bench bench-cli \
	bench-compare bench-check bench-report clean

install:
	$(PYTHON) scripts/install_env.py test

install-main:
	$(PYTHON) scripts/install_env.py main

install-bench:
	$(PYTHON) scripts/install_env.py bench

# The console script lives in the environment of $(PYTHON); `python -m` finds it even when
# that environment's bin/ is not on PATH.
main: install-main
	$(PYTHON) -m fastcompress info
	$(PYTHON) -m fastcompress demo $(DEMO_ARGS)

bench-cli: install-bench
	$(PYTHON) -m fastcompress bench

test: install
	$(PYTHON) -m pytest tests -q $(PYTEST_ARGS)

checkstyle:
	$(PIP) install -q -r requirements-dev.txt
	ruff check fastcompress triton_kernels tests benchmarks scripts setup.py
	ruff format --check fastcompress triton_kernels tests benchmarks scripts setup.py
	clang-format --dry-run -Werror csrc/include/fastcompress/* csrc/cpu/*.cpp csrc/cpu/*.h csrc/cpu/*.inc csrc/cuda/*
	$(PYTHON) -m pip install -q import-linter==2.17
	lint-imports --no-cache

format:
	ruff format fastcompress triton_kernels tests benchmarks scripts setup.py
	clang-format -i csrc/include/fastcompress/* csrc/cpu/*.cpp csrc/cpu/*.h csrc/cpu/*.inc csrc/cuda/*

# Every run is kept in bench-history/<machine key>/ (pytest-benchmark's storage); the ratio
# table of the run goes to bench-results/ratios.json (benchmarks/conftest.py).
bench: install-bench
	mkdir -p bench-results
	$(PYTHON) scripts/bench_track.py run --benchmark-json=bench-results/benchmarks.json $(PYTEST_ARGS)

# The last run against the previous one on this machine key: medians, their change beside
# the rounds' own spread, and the change of every same-run ratio.
bench-compare:
	$(PYTHON) scripts/bench_track.py compare

# The regression gate (about 2 minutes): same-run ratios of a quick profile against the
# floors per ISA level in benchmarks/floors.json; fails naming each ratio below its floor.
bench-check: install
	$(PYTHON) scripts/bench_track.py check

# Each headline ratio over the runs in bench-history: bench-results/trend.png and .md.
bench-report:
	$(PYTHON) scripts/bench_track.py report

clean:
	rm -rf build *.egg-info fastcompress/*.so fastcompress/*.so.key bench-results demo-results .benchmarks
