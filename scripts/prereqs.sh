# Prerequisites of building, testing and running Leasehold, each checked the way the
# build or the tests use it (a capability, not a command name). Sourced by
# scripts/doctor.sh (reports) and scripts/install-deps.sh (installs what a check says is
# missing). Needs no network.
#
# Each check_<item> prints one detail line on stdout and returns 0 when the capability is
# there. PREREQ_FIX[<item>] says how to get it; PREREQ_APT[<item>] names the Debian
# packages that provide it (empty when apt cannot).

cache="${LEASEHOLD_CACHE:-$HOME/.cache/leasehold}"
prereqs_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# The order the report prints in.
PREREQ_ITEMS=(cargo protoc etcd curl iproute2 java maven python chromium go kafka-jars helm python-tools)

declare -A PREREQ_APT=(
  [protoc]="protobuf-compiler libprotobuf-dev"
  [etcd]="etcd-server"
  [curl]="curl"
  [iproute2]="iproute2"
  [java]="openjdk-17-jre-headless"
  [maven]="maven"
  [python]="python3 python3-venv"
  [chromium]="chromium chromium-driver"
)
declare -A PREREQ_FIX=(
  [cargo]="install Rust with rustup (https://rustup.rs); the toolchain is not installed by the project"
  [protoc]="make deps  (apt-get install protobuf-compiler libprotobuf-dev)"
  [etcd]="make deps  (apt-get install etcd-server)"
  [curl]="make deps  (apt-get install curl)"
  [iproute2]="make deps  (apt-get install iproute2)"
  [java]="make deps  (apt-get install openjdk-17-jre-headless)"
  [maven]="make deps  (apt-get install maven)"
  [python]="make deps  (apt-get install python3 python3-venv)"
  [chromium]="make deps  (apt-get install chromium chromium-driver)"
  [python-tools]="make py-deps  (the Prometheus OpenMetrics parser from PyPI, into a virtualenv)"
  [go]="install Go 1.22 or newer (https://go.dev/dl); Debian's golang is too old for helm"
  [kafka-jars]="make kafka-deps  (Apache Kafka's jars from Maven Central)"
  [helm]="make helm-deps  (go install helm.sh/helm/v3/cmd/helm)"
)

check_cargo() {
  command -v cargo >/dev/null || { echo "cargo not on PATH"; return 1; }
  cargo --version
}

# etcd-client's build script runs protoc on etcd's protos, which import Google's
# well-known types (descriptor.proto, struct.proto, ...). protoc without them fails the
# build, so compile a file that imports them, as the build does.
check_protoc() {
  local protoc="${PROTOC:-protoc}"
  command -v "$protoc" >/dev/null || { echo "protoc not on PATH"; return 1; }
  local dir out
  dir="$(mktemp -d)"
  cat >"$dir/check.proto" <<'EOP'
syntax = "proto3";
import "google/protobuf/descriptor.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/duration.proto";
message Check { google.protobuf.Struct s = 1; google.protobuf.Duration d = 2; }
EOP
  if out="$("$protoc" -I"$dir" --descriptor_set_out="$dir/out.pb" "$dir/check.proto" 2>&1)"; then
    rm -rf "$dir"
    echo "$("$protoc" --version), well-known types importable"
  else
    rm -rf "$dir"
    echo "$("$protoc" --version 2>/dev/null) cannot import the well-known types: $(echo "$out" | head -1)"
    return 1
  fi
}

# The integration tests and `make run` start etcd 3.4 or newer (v3 API, leases).
check_etcd() {
  command -v etcd >/dev/null || { echo "etcd not on PATH"; return 1; }
  local v
  v="$(etcd --version 2>/dev/null | sed -n 's/^etcd Version: //p')"
  case "$v" in
    3.[4-9]* | 3.[1-9][0-9]*) echo "etcd $v" ;;
    *) echo "etcd ${v:-of unknown version} is older than 3.4"; return 1 ;;
  esac
}

check_curl() {
  command -v curl >/dev/null || { echo "curl not on PATH"; return 1; }
  local out
  out="$(curl --version)"
  echo "${out%%$'\n'*}" | cut -d' ' -f1-2
}

# The chaos suite puts instances in network namespaces with `ip netns` and veth pairs.
check_iproute2() {
  command -v ip >/dev/null || { echo "ip not on PATH"; return 1; }
  ip -V
}

# The Kafka broker the tests start runs on Java 17 or newer.
check_java() {
  command -v java >/dev/null || { echo "java not on PATH"; return 1; }
  local v
  v="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)"
  if [ "${v:-0}" -ge 17 ]; then echo "java $v"; else echo "java ${v:-?} is older than 17"; return 1; fi
}

check_maven() {
  command -v mvn >/dev/null || { echo "mvn not on PATH"; return 1; }
  local out
  out="$(mvn -B -v 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g')" || { echo "mvn -v failed"; return 1; }
  echo "${out%%$'\n'*}"
}

# The integration tests run Python tools from a virtualenv (scripts/install-python-tools.sh);
# Debian's python3 makes one only with python3-venv (ensurepip).
check_python() {
  command -v python3 >/dev/null || { echo "python3 not on PATH"; return 1; }
  python3 -c "import venv, ensurepip" 2>/dev/null || { echo "$(python3 --version) cannot create a virtualenv (no ensurepip)"; return 1; }
  echo "$(python3 --version) with venv"
}

# The status page test drives headless Chromium through chromedriver (WebDriver).
check_chromium() {
  command -v chromium >/dev/null || { echo "chromium not on PATH"; return 1; }
  command -v chromedriver >/dev/null || { echo "chromedriver not on PATH"; return 1; }
  local v
  v="$(chromium --version 2>/dev/null | head -1)" || { echo "chromium --version failed"; return 1; }
  echo "${v:-chromium}, $(chromedriver --version 2>/dev/null | cut -d' ' -f1-2)"
}

check_go() {
  command -v go >/dev/null || { echo "go not on PATH"; return 1; }
  local v
  v="$(go env GOVERSION 2>/dev/null)"
  case "$v" in
    go1.2[2-9]* | go1.[3-9][0-9]* | go[2-9]*) echo "$v" ;;
    *) echo "${v:-go of unknown version} is older than go1.22"; return 1 ;;
  esac
}

# Fetched by scripts/install-kafka.sh; the stamp records which pom they came from.
check_kafka-jars() {
  local libs="$cache/kafka/libs" pom="$prereqs_dir/kafka/pom.xml"
  if [ ! -f "$libs/.pom.sha256" ]; then echo "no jars in $libs"; return 1; fi
  if [ "$(cat "$libs/.pom.sha256")" != "$(sha256sum "$pom" | cut -d' ' -f1)" ]; then
    echo "jars in $libs are from another version of scripts/kafka/pom.xml"
    return 1
  fi
  local jar
  jar="$(ls "$libs"/kafka_2.13-*.jar 2>/dev/null | grep -v -- '-test' | head -1)"
  [ -n "$jar" ] || { echo "no kafka_2.13 jar in $libs"; return 1; }
  echo "$(basename "$jar" .jar) ($(ls "$libs"/*.jar | wc -l) jars)"
}

check_helm() {
  local helm="$cache/bin/helm" want
  want="$(sed -n 's/^HELM_VERSION=//p' "$prereqs_dir/install-helm.sh")"
  [ -x "$helm" ] || { echo "no helm in $cache/bin"; return 1; }
  local v
  v="$("$helm" version --short 2>/dev/null)"
  case "$v" in
    "${want%.*}"*) echo "helm $v" ;;
    *) echo "helm ${v:-?} is not the pinned $want"; return 1 ;;
  esac
}

check_python-tools() {
  local venv="$cache/venv" requirements="$prereqs_dir/../integration-tests/python/requirements.txt"
  [ -x "$venv/bin/python" ] || { echo "no virtualenv at $venv"; return 1; }
  cmp -s "$requirements" "$venv/requirements.txt" || { echo "$venv is from another requirements.txt"; return 1; }
  echo "$("$venv/bin/python" --version) in $venv"
}
