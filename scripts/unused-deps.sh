#!/usr/bin/env bash
# Fails when a crate declares a dependency its code never names, or the workspace
# declares one no crate uses. A name-based check (what `cargo machete` does), run in
# `make test`; generated code that uses a dependency is listed in KEEP.
set -uo pipefail
cd "$(dirname "$0")/.."

declare -A KEEP=(
  [crates/proto:prost]=1          # the generated code (include!) uses them
  [crates/proto:tonic-prost]=1
)
unused=0
for crate in crates/* integration-tests; do
  deps=$(sed -n '/^\[dependencies\]/,/^\[/p;/^\[dev-dependencies\]/,/^\[/p' "$crate/Cargo.toml" |
    grep -oE '^[a-z0-9_-]+' | sort -u)
  for dep in $deps; do
    [ -n "${KEEP[$crate:$dep]:-}" ] && continue
    name=${dep//-/_}
    if ! grep -rqE "\\b$name\\b" "$crate/src" "$crate/tests" "$crate/build.rs" "$crate/examples" 2>/dev/null; then
      echo "unused dependency: $dep in $crate/Cargo.toml"
      unused=$((unused + 1))
    fi
  done
done
for dep in $(sed -n '/^\[workspace.dependencies\]/,/^\[/p' Cargo.toml | grep -oE '^[a-z0-9_-]+'); do
  if ! grep -qE "^$dep( |\\.)" crates/*/Cargo.toml integration-tests/Cargo.toml; then
    echo "unused workspace dependency: $dep in Cargo.toml"
    unused=$((unused + 1))
  fi
done
if [ "$unused" -gt 0 ]; then
  exit 1
fi
echo "dependencies: every declared dependency is used"
