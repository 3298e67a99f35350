#!/usr/bin/env bash
# Runs tests/sglang under the SGLang virtualenv, against the real SGLang (not skippable there):
# the version contract, the layout adapter on SGLang's own ForwardBatch, and a real SGLang server
# with the plugin on tiny random Llama and Qwen3 models (~2 min on 2 cores, after the venv exists).
#
#   bash scripts/sglang/run-tests.sh            # builds .cache/sglang-venv first if needed (~3 min)
#   bash scripts/sglang/run-tests.sh -k layout  # extra pytest arguments
#
# TENSORTRACE_SKIP_SGLANG=1 skips everything with that reason (for machines where SGLang cannot be
# installed); without it, a failed install fails the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
if [[ "${TENSORTRACE_SKIP_SGLANG:-}" == "1" ]]; then
  echo "SGLang tests SKIPPED: TENSORTRACE_SKIP_SGLANG=1 (SGLang cannot be installed on this machine)"
  exit 0
fi
VENV="${SGLANG_VENV:-$ROOT/.cache/sglang-venv}"
SGLANG_VENV="$VENV" bash scripts/sglang/setup-venv.sh
# The CPU stand-in for sgl_kernel (scripts/sglang/sgl_kernel_stub) must shadow the CUDA-only wheel in
# the test process and in the SGLang servers it launches (they inherit the environment).
export PYTHONPATH="$ROOT/scripts/sglang/sgl_kernel_stub${PYTHONPATH:+:$PYTHONPATH}"
export SGLANG_USE_CPU_ENGINE=1 TENSORTRACE_REQUIRE_SGLANG=1
# --confcutdir: the suite-wide tests/conftest.py (Kafka, ClickHouse fixtures) is not needed here and
# its dependencies are not in the SGLang venv.
exec "$VENV/bin/python" -m pytest tests/sglang --confcutdir tests/sglang -p no:cacheprovider -q \
  -W ignore::DeprecationWarning "$@"
