#!/usr/bin/env bash
# `make deps`: installs, with apt, what building and testing Leasehold needs from
# Debian: protoc with Google's well-known types (protobuf-compiler + libprotobuf-dev),
# etcd-server, curl, iproute2, Java/Maven, python3-venv and headless Chromium with
# chromedriver (the status page test) when absent. Decides per capability
# (scripts/prereqs.sh), not per command, and proves the result by checking again.
# Idempotent: does nothing, and needs no network, when everything is present.
#
# --system-only: skip the Rust toolchain check (used by the fresh-machine test, which
# runs this script in a bare Debian root without Rust).
set -euo pipefail
. "$(dirname "$0")/prereqs.sh"

apt_items=(protoc etcd curl iproute2 java maven python chromium)
if [ "${1:-}" != "--system-only" ] && ! check_cargo >/dev/null 2>&1; then
  echo "error: cargo not found; ${PREREQ_FIX[cargo]}" >&2
  exit 1
fi

need=()
for item in "${apt_items[@]}"; do
  if ! "check_$item" >/dev/null 2>&1; then
    # shellcheck disable=SC2206 # a list of package names
    need+=(${PREREQ_APT[$item]})
  fi
done
if ((${#need[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "installing ${need[*]} with apt-get"
  # A fresh machine's first minutes: a mirror that drops a download, or another apt
  # (unattended upgrades) holding the lock. apt retries downloads and waits for the
  # lock itself; the whole step is tried three times before it fails the run.
  apt_opts=(-o Acquire::Retries=3 -o DPkg::Lock::Timeout=300)
  for attempt in 1 2 3; do
    if $sudo apt-get "${apt_opts[@]}" update -qq &&
      DEBIAN_FRONTEND=noninteractive $sudo apt-get "${apt_opts[@]}" install -y -qq \
        --no-install-recommends "${need[@]}" >/dev/null; then
      break
    fi
    if [ "$attempt" -eq 3 ]; then
      echo "error: apt-get could not install ${need[*]} (3 attempts)" >&2
      exit 1
    fi
    echo "apt-get failed (attempt $attempt of 3); retrying in $((attempt * 10)) s" >&2
    sleep $((attempt * 10))
  done
fi

# etcd-server's package starts a system etcd on 2379; ours run on their own ports, so
# that one is harmless, but stop it where we can to keep the machine quiet.
if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd 2>/dev/null || true
fi

# Prove it: a package list that lacks a piece fails here, not deep inside a build.
if ((${#need[@]})); then
  exec "$(dirname "$0")/doctor.sh" "${apt_items[@]}"
fi
