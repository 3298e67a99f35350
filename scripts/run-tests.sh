#!/usr/bin/env bash
# The test suite (what `make test` runs): every test under tests/; GPU tests skip with a reason without CUDA.
# Extra arguments go to pytest, e.g. `bash scripts/run-tests.sh -k kafka -x`.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="$root/.venv/bin/python"
[[ -x "$py" ]] || { echo "error: $py not found: run \`make setup\` first" >&2; exit 1; }

# GPU tests are collected everywhere; without CUDA the conftest skips each with a reason (shown
# in the summary), so a run says exactly what it did not cover.
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "run-tests: no CUDA here: tests marked gpu will be skipped (reason in the summary)"
fi

start=$(date +%s)
"$py" -m pytest tests -p no:cacheprovider "$@"
rc=$?
elapsed=$(( $(date +%s) - start ))

case $rc in
  0) echo "run-tests: main suite PASSED in ${elapsed}s" ;;
  5) echo "run-tests: FAILED: pytest collected no tests (exit 5): is tests/ empty or the selection wrong?" >&2 ;;
  *) echo "run-tests: main suite FAILED (pytest exit $rc) after ${elapsed}s" >&2 ;;
esac

start=$(date +%s)
bash "$root/scripts/sglang/run-tests.sh"
src=$?
elapsed=$(( $(date +%s) - start ))
if [[ $src -eq 0 ]]; then
  echo "run-tests: SGLang suite PASSED in ${elapsed}s"
else
  echo "run-tests: SGLang suite FAILED (exit $src) after ${elapsed}s" >&2
fi
[[ $rc -ne 0 ]] && exit $rc
exit $src
