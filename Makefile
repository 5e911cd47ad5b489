# The four verbs: demo, test, lint, bench. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SERVICES := $(PYTHON) deploy/local/services.py

.PHONY: demo test test-cluster lint bench tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: apply an example fleet, run a dispatcher and workers, submit a mixed workload
demo: $(STAMP)
	$(SERVICES) -- $(PY) -m devtools.demo

## test: the whole suite against the real RabbitMQ, Redis, identity provider and Prometheus
test: $(STAMP) tools
	$(SERVICES) -- $(PY) -m pytest $(PYTEST_ARGS)

## test-cluster: only the cluster tests (their own 3-node RabbitMQ cluster and Redis Sentinel
## group on free ports; the shared services are not used), with the timings they measure
test-cluster: $(STAMP) tools
	$(PY) -m pytest tests/cluster -m cluster $(PYTEST_ARGS)

## lint: ruff (lint + format) and mypy --strict
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## bench: the benchmark harness (not part of test); writes bench/results/latest.json
bench: $(STAMP)
	$(SERVICES) -- $(PY) -m bench $(BENCH_ARGS)

## tools: the Prometheus server and promtool, rabbitmq-server and redis-server the tests run
tools:
	@sh deploy/local/install-tools.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
