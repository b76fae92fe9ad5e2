#!/usr/bin/env bash
# Installs the pinned helm and builds the manifest validator into
# $HOME/.cache/leasehold/bin, through the Go module proxy. Idempotent.
set -euo pipefail

HELM_VERSION=v3.22.0
cache="${LEASEHOLD_CACHE:-$HOME/.cache/leasehold}"
export GOBIN="$cache/bin" GOMODCACHE="$cache/go/mod" GOCACHE="$cache/go/build"
mkdir -p "$GOBIN"

if ! command -v go >/dev/null; then
  echo "error: go not found; the chart checks build helm with Go" >&2
  exit 1
fi
if [ ! -x "$GOBIN/helm" ] || ! "$GOBIN/helm" version --short 2>/dev/null | grep -q "${HELM_VERSION%.*}"; then
  echo "installing helm $HELM_VERSION with go install (first time: a minute or two)"
  go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
# Rebuilt when its source changes (go's build cache makes this cheap otherwise).
(cd "$(dirname "$0")/../helm/tools/kubevalidate" && go build -o "$GOBIN/kubevalidate" .)
