# The four verbs: demo, test, lint, bench. Each sets itself up on a fresh machine.
# Deployment helpers: constraints (re-pin), image (build deploy/Dockerfile), image-test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SERVICES := $(PYTHON) deploy/local/services.py

CONTAINER ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
IMAGE ?= rundispatch:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: demo test test-cluster coverage mutation lint bench soak tools constraints image image-test clean

# Installs with the pinned versions of constraints.txt (make constraints re-pins them).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## demo: apply an example fleet, run a dispatcher and workers, submit a mixed workload
demo: $(STAMP)
	$(SERVICES) -- $(PY) -m devtools.demo

## test: the whole suite against the real RabbitMQ, Redis, identity provider and Prometheus,
## under coverage.py (the processes the tests start are measured too); the data of every
## process is combined and reported, and a whole-suite run fails under the floor (90 %,
## [tool.coverage.report] in pyproject.toml). With PYTEST_ARGS (a subset) the floor is not checked.
test: $(STAMP) tools
	rm -rf .coverage-data && mkdir -p .coverage-data
	$(SERVICES) -- $(VENV)/bin/coverage run -m pytest $(PYTEST_ARGS)
	$(VENV)/bin/coverage combine --quiet
	$(VENV)/bin/coverage report $(if $(PYTEST_ARGS),--fail-under=0)

## coverage: the same as test (kept as a name for the coverage run)
coverage: test

## mutation: mutmut over the core's dispatch rules, the lifecycle and placement use cases and
## the Lua glue ([tool.mutmut] in pyproject.toml); prints the score and the survivors and fails
## under 85 % killed (docs/testing.md has the last score and explains each survivor)
mutation: $(STAMP)
	rm -rf mutants
	$(SERVICES) -- env HYPOTHESIS_PROFILE=mutation $(VENV)/bin/mutmut run --max-children 2
	$(PY) -m tests.support.mutation_score --floor 85

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

## soak: mixed load with faults on a timer (not part of test), MINUTES=30 by default; reports
## Redis memory, process RSS and key counts after warm-up and at the end (bench/README.md)
MINUTES ?= 30
soak: $(STAMP)
	$(SERVICES) -- $(PY) -m bench.soak $(MINUTES)

## tools: what the tests run besides Python: prometheus/promtool, kubectl (kustomize), podman
tools:
	@sh deploy/local/install-tools.sh

## constraints: re-pin constraints.txt from pyproject.toml (after changing dependencies)
constraints:
	$(PYTHON) deploy/local/constraints.py

## image: build the container image from deploy/Dockerfile (CONTAINER=docker|podman)
image:
	$(CONTAINER) build -f deploy/Dockerfile -t $(IMAGE) .

## image-test: build the image with podman, run its commands and a run through it (~2-4 min)
image-test: $(STAMP) tools
	@sh deploy/local/install-tools.sh container
	$(SERVICES) -- $(PY) -m pytest tests/deploy -m container $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
