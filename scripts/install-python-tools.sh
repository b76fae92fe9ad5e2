#!/usr/bin/env bash
# Installs the Python tools the integration tests run into a virtualenv at
# $HOME/.cache/leasehold/venv, from PyPI: integration-tests/python/requirements.txt (the
# Prometheus project's OpenMetrics parser and the Python client's pinned dependencies)
# and the Python client package itself (clients/python). Idempotent: recreates the
# virtualenv only when the requirements change, and reinstalls the client only when a
# file under clients/python changes (a checksum of the tree is kept in the virtualenv).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
cache="${LEASEHOLD_CACHE:-$HOME/.cache/leasehold}"
venv="$cache/venv"
requirements="$here/integration-tests/python/requirements.txt"
client="$here/clients/python"

if ! command -v python3 >/dev/null; then
  echo "error: python3 not found (make deps installs Debian's python3 and python3-venv)" >&2
  exit 1
fi

# Checksum of every file of the client package, build leftovers and caches aside.
client_checksum() {
  (
    cd "$client"
    find . \( -name __pycache__ -o -name '.*_cache' -o -name build -o -name dist \
      -o -name '*.egg-info' \) -prune -o -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  ) | sha256sum | cut -d' ' -f1
}
checksum="$(client_checksum)"

requirements_current=false
if [ -x "$venv/bin/python" ] && cmp -s "$requirements" "$venv/requirements.txt"; then
  requirements_current=true
fi
if $requirements_current && [ "$(cat "$venv/client.sha256" 2>/dev/null)" = "$checksum" ]; then
  exit 0
fi

pip=("$venv/bin/pip" --quiet --disable-pip-version-check)
if ! $requirements_current; then
  echo "installing the Python test tools into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "${pip[@]}" install -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi

echo "installing the Python client (clients/python) into $venv"
# Built from a copy so that the build leaves nothing in the work tree.
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
cp -R "$client/." "$build/"
"${pip[@]}" install --no-deps --force-reinstall "$build"
"${pip[@]}" check
echo "$checksum" >"$venv/client.sha256"
