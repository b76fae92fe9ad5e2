#!/usr/bin/env bash
# Samples one instance with perf while the Kafka benchmark (one round, one instance)
# loads it, and prints the hottest frames. Needs root (perf_event) and Debian's
# linux-perf, which `make profile` installs.
set -euo pipefail
target="${CARGO_TARGET_DIR:?}"
out="$target/profile"
mkdir -p "$out"
log="$out/bench.log"
# In a process group of its own: the broker, etcd and handler it starts are ended with it.
KAFKA_BENCH_INSTANCES="${KAFKA_BENCH_INSTANCES:-1}" KAFKA_BENCH_MESSAGES="${KAFKA_BENCH_MESSAGES:-600000}" \
  LEASEHOLD_BIN="$target/release/leasehold" setsid "$target/release/leasehold-bench" --kafka-only >"$log" 2>&1 &
bench=$!
trap 'kill -- -"$bench" 2>/dev/null; pkill -f "$target/release/leasehold serve" 2>/dev/null || true' EXIT
pid=""
for _ in $(seq 600); do
  pid=$(pgrep -f "$target/release/leasehold serve" | head -1 || true)
  [ -n "$pid" ] && break
  sleep 0.5
done
[ -n "$pid" ] || { echo "no instance started; see $log"; exit 1; }
sleep 3
perf record -F 999 -g -p "$pid" -o "$out/perf.data" -- sleep "${PROFILE_SECONDS:-8}" >/dev/null 2>&1
perf report -i "$out/perf.data" --no-children --percent-limit 1 --stdio 2>/dev/null |
  grep -E '^ +[0-9]' | head -40 | tee "$out/top.txt"
echo "profile: $out/perf.data (perf report -i ...), top frames: $out/top.txt"
