# TensorTrace — `make demo` runs the main job, `make test` runs the suite. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
KAFKA_LIBS := .cache/kafka-libs
KAFKA_STAMP := $(KAFKA_LIBS)/.resolved
PROTOS := $(wildcard proto/tensortrace/v1/*.proto)

.PHONY: all setup kafka-jars proto demo test test-unit test-gpu bench clean sglang-env

all: setup

# A project virtualenv with the package (editable) and its dev deps; re-runs only when pyproject changes.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (need Python >= 3.10)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -e '.[dev]'
	@touch $@

# The real Kafka broker's jars, resolved from Maven Central by scripts/kafka/pom.xml.
$(KAFKA_STAMP): scripts/kafka/pom.xml
	@command -v java >/dev/null || { echo "error: java not found (need Java 17+ to run the local Kafka broker)"; exit 1; }
	@command -v mvn >/dev/null || { echo "error: mvn not found (need Maven to resolve the Kafka jars)"; exit 1; }
	mvn -q -B -f scripts/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=$(abspath $(KAFKA_LIBS))
	@touch $@

setup: $(STAMP) $(KAFKA_STAMP)
kafka-jars: $(KAFKA_STAMP)

# Regenerate the Python code for the wire format and gRPC services (checked in; a test fails when stale).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=services --pyi_out=services --grpc_python_out=services $(PROTOS)

# The demo serves through a real SGLang server with the plugin (builds the SGLang venv first, once);
# `make demo BACKEND=hf` is the Hugging Face fallback and needs no SGLang venv.
BACKEND ?= sglang
demo: setup $(if $(filter sglang,$(BACKEND)),sglang-env)
	$(PY) -m tensortrace.demo --backend $(BACKEND)

test: setup
	bash scripts/run-tests.sh

test-unit: setup
	$(PY) -m pytest -m unit -q

test-gpu: setup
	$(PY) -m pytest -m gpu -q

# The separate virtualenv with the real SGLang (scripts/sglang/setup-venv.sh; ~11 GB, ~3 min once).
sglang-env:
	bash scripts/sglang/setup-venv.sh

bench: setup
	$(PY) scripts/bench/capture_overhead.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
