#!/usr/bin/env bash
# Runs the Python client's unit tests (clients/python/tests) in the test virtualenv and
# ends with a cargo-style "test result:" line, so `make test` adds them up with the rest.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${LEASEHOLD_CACHE:-$HOME/.cache/leasehold}/venv/bin/python"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
(cd "$here" && "$python" -m unittest discover -s clients/python/tests) 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
ran=$(sed -n 's/^Ran \([0-9]*\) tests\{0,1\} .*/\1/p' "$log")
failed=$(sed -n 's/^FAILED (.*failures=\([0-9]*\).*/\1/p' "$log")
errors=$(sed -n 's/^FAILED (.*errors=\([0-9]*\).*/\1/p' "$log")
bad=$(( ${failed:-0} + ${errors:-0} ))
if [ "$status" -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
passed=$(( ${ran:-0} - bad )); [ "$passed" -lt 0 ] && passed=0
echo "test result: $([ "$status" -eq 0 ] && echo ok || echo FAILED). $passed passed; $bad failed (Python client)"
exit "$status"
