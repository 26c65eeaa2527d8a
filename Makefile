# fastcompress: `make main` runs the main job (the demo), `make test` the test suite, `make
# bench` the benchmarks. Each first installs what it is missing (scripts/install_env.py:
# main < test < bench): an installed torch >= 2.4 is kept as it is; torch==2.13.0 (CPU)
# only where there is none.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install install-main install-bench main test checkstyle format bench bench-cli clean

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

bench: install-bench
	mkdir -p bench-results
	$(PYTHON) -m pytest benchmarks -q --benchmark-json=bench-results/benchmarks.json \
		--benchmark-columns=median,rounds

clean:
	rm -rf build *.egg-info fastcompress/*.so fastcompress/*.so.key bench-results demo-results .benchmarks
