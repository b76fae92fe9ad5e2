#!/usr/bin/env bash
# Installs the Python tools the integration tests run (integration-tests/python/
# requirements.txt: the Prometheus project's OpenMetrics parser) into a virtualenv at
# $HOME/.cache/leasehold/venv, from PyPI. Idempotent: reinstalls only when the
# requirements change.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cache="${LEASEHOLD_CACHE:-$HOME/.cache/leasehold}"
venv="$cache/venv"
requirements="$here/integration-tests/python/requirements.txt"

if ! command -v python3 >/dev/null; then
  echo "error: python3 not found (make deps installs Debian's python3 and python3-venv)" >&2
  exit 1
fi
if [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$venv/requirements.txt"; then
  exit 0
fi
echo "installing the Python test tools into $venv"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
cp "$requirements" "$venv/requirements.txt"
