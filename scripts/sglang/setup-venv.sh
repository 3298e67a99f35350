#!/usr/bin/env bash
# Builds the separate virtualenv that runs a real SGLang server with the TensorTrace plugin.
#
#   bash scripts/sglang/setup-venv.sh            # -> .cache/sglang-venv (idempotent, stamp file)
#   SGLANG_VENV=/opt/sgl bash scripts/sglang/setup-venv.sh
#
# Why a separate venv: sglang pins its own torch (a CUDA build, ~11 GB with its ~180 deps) and
# transformers, which must not disturb the project venv. Our package goes in editable with
# --no-deps so the SGLang-pinned torch/transformers stay as SGLang wants them.
# On a CPU-only machine SGLang's CPU engine imports `sgl_kernel`, whose CPU build is not on PyPI:
# scripts/sglang/sgl_kernel_stub/ holds a labelled pure-torch stand-in that callers put on PYTHONPATH.
# SGLang comes with its `tracing` extra (the OpenTelemetry SDK and OTLP exporters that
# `--enable-trace --otlp-traces-endpoint` needs; docs/bridge.md); a venv built before that gets it
# on the next run (the stamp name changed), in a few seconds.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
SGLANG_VERSION="${SGLANG_VERSION:-0.5.23}"
VENV="${SGLANG_VENV:-$ROOT/.cache/sglang-venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.installed-sglang-$SGLANG_VERSION-tracing"
# The stamp also depends on pyproject.toml (entry points are installed from it).
# The native taps' tensor-geometry reader is compiled against this venv's own torch (agent/geometry.py;
# a no-op when current, a message and the DLPack route without a C++ compiler).
build_geometry() { "$VENV/bin/python" -m tensortrace.agent.geometry build; }
if [[ -f "$STAMP" && "$STAMP" -nt "$ROOT/pyproject.toml" ]]; then
  build_geometry
  echo "sglang venv ready: $VENV (sglang $SGLANG_VERSION)"
  exit 0
fi
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found (need Python >= 3.10)" >&2; exit 1; }
avail_gb=$(df -Pk "$(dirname "$VENV")" 2>/dev/null | awk 'NR==2 {print int($4/1048576)}' || echo 0)
if [[ -n "$avail_gb" && "$avail_gb" -lt 15 ]]; then
  echo "error: sglang venv needs ~12 GB free under $(dirname "$VENV"), only ${avail_gb} GB available" >&2
  exit 1
fi
mkdir -p "$(dirname "$VENV")"
t0=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip wheel setuptools
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('sglang') != '$SGLANG_VERSION')" 2>/dev/null; then
  "$VENV/bin/pip" install -q "sglang[tracing]==$SGLANG_VERSION"
fi
# SGLang's tracing extra, for a venv that has SGLang without it (pip adds only the missing packages).
if ! "$VENV/bin/python" -c "import opentelemetry.sdk.trace, opentelemetry.exporter.otlp.proto.grpc.trace_exporter, opentelemetry.exporter.otlp.proto.http.trace_exporter" 2>/dev/null; then
  "$VENV/bin/pip" install -q "sglang[tracing]==$SGLANG_VERSION"
fi
# Our package, editable, without letting pip touch SGLang's pinned dependency set; plus what our
# package needs that sglang does not already bring (checked, installed only if missing).
"$VENV/bin/pip" install -q --no-deps -e "$ROOT"
"$VENV/bin/pip" install -q pytest pytest-timeout crc32c zstandard lz4 protobuf numpy opentelemetry-api 2>/dev/null \
  || "$VENV/bin/pip" install -q pytest pytest-timeout crc32c zstandard lz4
build_geometry
touch "$STAMP"
echo "sglang venv built in $(( $(date +%s) - t0 )) s: $VENV (sglang $SGLANG_VERSION)"
