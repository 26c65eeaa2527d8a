# fastcompress: `make main` runs the main job (the demo), `make test` the test suite. Both install
# what is missing first; the torch pin keeps the CPU build (no CUDA packages).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=

.PHONY: install main test checkstyle format bench bench-cli clean

install:
	@# torch first, and only the CPU build from the local wheel: any other route (PyPI,
	@# build isolation) pulls several GB of CUDA packages, so stop instead.
	@$(PYTHON) -c "import torch, sys; sys.exit(not torch.__version__.startswith('2.13.0'))" \
		2>/dev/null || { ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1 \
		&& $(PIP) install -q torch==2.13.0 --find-links /opt/wheels; } \
		|| { echo "no torch 2.13.0 and no CPU wheel in /opt/wheels: install a CPU torch first"; exit 1; }
	$(PIP) install -q -r requirements.txt
	@# (Re)install the package in editable mode when it is missing or points elsewhere.
	@$(PYTHON) -c "import fastcompress, os, sys; \
sys.exit(os.path.dirname(fastcompress.__path__[0]) != os.getcwd())" 2>/dev/null \
	|| $(PIP) install -q --no-build-isolation --no-deps -e .

main: install
	fastcompress info
	fastcompress demo

bench-cli: install
	fastcompress bench

test: install
	$(PYTHON) -m pytest tests -q $(PYTEST_ARGS)

checkstyle:
	$(PIP) install -q -r requirements-dev.txt
	ruff check fastcompress triton_kernels tests benchmarks setup.py
	ruff format --check fastcompress triton_kernels tests benchmarks setup.py
	clang-format --dry-run -Werror csrc/include/fastcompress/* csrc/cpu/*.cpp csrc/cuda/*

format:
	ruff format fastcompress triton_kernels tests benchmarks setup.py
	clang-format -i csrc/include/fastcompress/* csrc/cpu/*.cpp csrc/cuda/*

bench: install
	mkdir -p bench-results
	$(PYTHON) -m pytest benchmarks -q --benchmark-json=bench-results/benchmarks.json \
		--benchmark-columns=median,rounds

clean:
	rm -rf build *.egg-info fastcompress/*.so bench-results demo-results .benchmarks
