#!/usr/bin/env bash
# Fetches Apache Kafka's jars (KRaft broker) and a log4j2 binding from Maven Central
# into $HOME/.cache/leasehold/kafka/libs, for the tests and `make run`. Idempotent.
set -euo pipefail

cache="${LEASEHOLD_CACHE:-$HOME/.cache/leasehold}"
libs="$cache/kafka/libs"
pom="$(cd "$(dirname "$0")/kafka" && pwd)/pom.xml"
stamp="$libs/.pom.sha256"
want="$(sha256sum "$pom" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
for tool in java mvn; do
  if ! command -v "$tool" >/dev/null; then
    echo "error: $tool not found; the Kafka broker for tests runs on Java 17 with jars fetched by Maven" >&2
    exit 1
  fi
done
echo "fetching Apache Kafka jars with Maven into $libs"
rm -rf "$libs"
mkdir -p "$libs"
mvn -q -B -f "$pom" -Dmaven.repo.local="$cache/m2" dependency:copy-dependencies -DoutputDirectory="$libs"
echo "$want" >"$stamp"
