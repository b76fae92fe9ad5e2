#!/usr/bin/env bash
# The install path on a fresh machine: a bare Debian 12 root (debootstrap minbase, no
# protoc, no etcd, no Java) in a throwaway directory, where scripts/install-deps.sh must
# install every system prerequisite and scripts/doctor.sh must report each one, missing
# before and present after. A package list that forgets a piece (libprotobuf-dev, say)
# fails here, whatever this machine happens to have installed.
#
# Needs root (chroot, mount) and Debian's package mirror; the bare root is cached as a
# tarball under $HOME/.cache/leasehold/fresh-machine. Ends with a cargo-style
# "test result:" line that scripts/test-summary.sh adds up.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cache="${LEASEHOLD_CACHE:-$HOME/.cache/leasehold}/fresh-machine"
base="$cache/bookworm-minbase.tar.gz"
system_items=(protoc etcd curl iproute2 java maven python chromium)

if [ "$(id -u)" -ne 0 ]; then
  echo "test-fresh-machine: skipped (needs root for chroot)"
  exit 0
fi

passed=0
failed=0
check() { # name, then a command that must succeed
  local name="$1"
  shift
  if "$@"; then
    echo "test fresh_machine::$name ... ok"
    passed=$((passed + 1))
  else
    echo "test fresh_machine::$name ... FAILED"
    failed=$((failed + 1))
  fi
}

if [ ! -f "$base" ]; then
  if ! command -v debootstrap >/dev/null; then
    echo "installing debootstrap with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  fi
  mkdir -p "$cache"
  build="$(mktemp -d /tmp/leasehold-debootstrap.XXXXXX)"
  echo "building a bare Debian 12 root with debootstrap (once; cached in $base)"
  if ! debootstrap --variant=minbase bookworm "$build/root" http://deb.debian.org/debian >"$build/log" 2>&1; then
    tail -20 "$build/log" >&2
    rm -rf "$build"
    exit 1
  fi
  tar -C "$build/root" -czf "$base.tmp" .
  mv "$base.tmp" "$base"
  rm -rf "$build"
fi

root="$(mktemp -d /tmp/leasehold-fresh.XXXXXX)"
cleanup() {
  umount "$root/proc" 2>/dev/null || true
  rm -rf "$root"
}
trap cleanup EXIT
tar -C "$root" -xzf "$base"
mkdir -p "$root/src"
cp -r "$here" "$root/src/scripts"
mount -t proc proc "$root/proc"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }

# The doctor's report on the root: exit status $1, and every system item on a line
# starting with $2 ("MISSING " or "ok      ").
reports_all() {
  local want_status="$1" state="$2" report status=0 item
  report="$(in_root bash /src/scripts/doctor.sh "${system_items[@]}" 2>&1)" || status=$?
  echo "$report" | sed 's/^/  doctor: /'
  [ "$status" -eq "$want_status" ] || return 1
  for item in "${system_items[@]}"; do
    grep -q "^$state $item " <<<"$report" || return 1
  done
  # Whatever is missing comes with the command that installs it.
  [ "$want_status" -eq 0 ] || grep -q "→ make deps" <<<"$report"
}

# Before: every system prerequisite is reported missing, each with its install command.
check doctor_reports_missing_on_a_bare_root reports_all 1 "MISSING "

# Install, as `make deps` does, then every check passes (install-deps ends with the doctor).
installs() { in_root bash /src/scripts/install-deps.sh --system-only 2>&1 | grep -v -e '^debconf:' -e 'posix_openpt' -e 'invoke-rc.d' | sed 's/^/  install: /'; }
check install_deps_installs_every_system_prerequisite installs
check doctor_reports_ok_after_install reports_all 0 "ok      "

# Idempotent and offline: with name resolution gone, a second run installs nothing and
# succeeds.
offline_noop() {
  rm -f "$root/etc/resolv.conf"
  local out
  out="$(in_root bash /src/scripts/install-deps.sh --system-only 2>&1)" || return 1
  ! grep -q "installing" <<<"$out"
}
check install_deps_is_a_noop_offline_when_present offline_noop

# protoc without the well-known types (the fresh-machine failure this guards against)
# is reported as missing, not as present.
protoc_without_wkt() {
  in_root dpkg -r --force-depends libprotobuf-dev >/dev/null 2>&1 || return 1
  local out
  out="$(in_root bash /src/scripts/doctor.sh protoc 2>&1)" && return 1
  grep -q "^MISSING  protoc .*cannot import the well-known types" <<<"$out"
}
check doctor_detects_protoc_without_well_known_types protoc_without_wkt

# The prerequisites that live in the project's cache (Kafka jars, helm) are reported
# missing when the cache is empty.
empty_cache_reports() {
  local empty out
  empty="$(mktemp -d)"
  out="$(LEASEHOLD_CACHE="$empty" "$here/doctor.sh" kafka-jars helm 2>&1)" && { rm -rf "$empty"; return 1; }
  rm -rf "$empty"
  grep -q "^MISSING  kafka-jars .*→\|^MISSING  kafka-jars " <<<"$out" && grep -q "^MISSING  helm " <<<"$out"
}
check doctor_reports_missing_cached_tools empty_cache_reports

if [ "$failed" -eq 0 ]; then result=ok; else result=FAILED; fi
echo "test result: $result. $passed passed; $failed failed"
[ "$failed" -eq 0 ]
