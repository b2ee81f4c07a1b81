# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# torch first, from the local CPU wheel, and pinned again next to everything else so pip never
# swaps in a CUDA build.
TORCH := torch==2.13.0

.PHONY: setup demo test test-wip test-unit lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mova demo

# Serving and the features/train benchmarks' integration tests are still being finished
# (issues 6 and the benchmark parts); they run with `make test-wip`.
WIP := --ignore=tests/integration/test_serve_app.py --ignore=tests/integration/test_serve_cluster.py \
       --ignore=tests/integration/test_bench_ray.py --ignore=tests/unit/test_serve.py

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -q $(WIP)

test-wip: $(STAMP)
	$(PY) -m pytest -q tests/integration/test_serve_app.py tests/integration/test_serve_cluster.py \
	    tests/integration/test_bench_ray.py tests/unit/test_serve.py

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/mova bench model

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
