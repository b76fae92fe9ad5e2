#!/usr/bin/env bash
# `make doctor`: one line per prerequisite, checked the way the build and the tests use
# it, with the command that installs what is missing. Needs no network. Exits 1 when
# something is missing. With item names as arguments, checks only those.
set -uo pipefail
. "$(dirname "$0")/prereqs.sh"

items=("$@")
((${#items[@]})) || items=("${PREREQ_ITEMS[@]}")
missing=0
for item in "${items[@]}"; do
  if ! declare -F "check_$item" >/dev/null; then
    echo "doctor: unknown item '$item' (known: ${PREREQ_ITEMS[*]})" >&2
    exit 2
  fi
  if detail="$("check_$item" 2>&1)"; then
    printf '%-8s %-12s %s\n' ok "$item" "$detail"
  else
    printf '%-8s %-12s %s\n' MISSING "$item" "$detail"
    printf '%-8s %-12s → %s\n' "" "" "${PREREQ_FIX[$item]}"
    missing=1
  fi
done
exit "$missing"
