#!/usr/bin/env bash
# Chart checks: lint, render, validate every manifest against Kubernetes' API types,
# run the binary on the rendered configuration (lock-step), and make sure bad values
# are rejected with a readable message. Ends with a cargo-style "test result:" line.
set -uo pipefail

cd "$(dirname "$0")"
bin="${LEASEHOLD_BIN:?set LEASEHOLD_BIN to the leasehold binary}"
tools="${LEASEHOLD_CACHE:-$HOME/.cache/leasehold}/bin"
helm="$tools/helm"
validate="$tools/kubevalidate"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
passed=0
failed=0

ok() { passed=$((passed + 1)); echo "ok   $1"; }
fail() { failed=$((failed + 1)); echo "FAIL $1"; [ -n "${2:-}" ] && sed 's/^/     /' <<<"$2"; }

# check NAME CMD... : passes when CMD exits 0.
check() {
  local name=$1; shift
  local out
  if out=$("$@" 2>&1); then ok "$name"; else fail "$name" "$out"; fi
}

# rejects NAME EXPECTED-TEXT helm-args... : helm template must fail, saying EXPECTED-TEXT.
rejects() {
  local name=$1 want=$2; shift 2
  local out
  if out=$("$helm" template t leasehold "$@" 2>&1); then
    fail "$name" "rendered although it should have been rejected"
  elif grep -qF -- "$want" <<<"$out"; then
    ok "$name"
  else
    fail "$name" "rejected without saying '$want':"$'\n'"$out"
  fi
}

declare -A values=(
  [default]=""
  [all-options]="ci/all-options-values.yaml"
  [dev-etcd-hpa]="ci/dev-etcd-hpa-values.yaml"
)

for name in default all-options dev-etcd-hpa; do
  args=()
  [ -n "${values[$name]}" ] && args=(-f "${values[$name]}")
  check "$name: helm lint --strict" "$helm" lint --strict leasehold "${args[@]}"
  out="$work/$name"
  mkdir -p "$out"
  if ! "$helm" template t leasehold "${args[@]}" >"$out/manifests.yaml" 2>"$out/err"; then
    fail "$name: helm template" "$(cat "$out/err")"
    continue
  fi
  ok "$name: helm template"
  check "$name: manifests match Kubernetes API types (strict)" \
    bash -c "\"$validate\" -extract \"$out\" <\"$out/manifests.yaml\""

  # Lock-step: the binary accepts the rendered config, flags and environment.
  mapfile -t cmd <"$out/args.txt"
  mapfile -t envs < <(sed "s#^LEASEHOLD_CONFIG=.*#LEASEHOLD_CONFIG=$out/config.toml#" "$out/env.txt")
  if printed=$(env -i "${envs[@]}" "$bin" "${cmd[@]}" --print-config 2>&1); then
    ok "$name: leasehold ${cmd[*]} accepts the rendered configuration"
    shards=$(sed -n 's/^shards = //p' "$out/config.toml")
    if grep -qx "shards = $shards" <<<"$printed" && grep -q '^id = "leasehold-0"' <<<"$printed" &&
       grep -q '^advertise = "10.0.0.1:' <<<"$printed"; then
      ok "$name: effective config has the chart's shards, pod name and pod IP"
    else
      fail "$name: effective config differs from the chart's" "$printed"
    fi
    if [ "$(grep -c '^\[\[kafka\]\]' "$out/config.toml")" = "$(grep -c '^\[\[kafka\]\]' <<<"$printed")" ]; then
      ok "$name: every Kafka source of the chart is in the effective config"
    else
      fail "$name: effective config differs from the chart's" "$printed"
    fi
  else
    fail "$name: leasehold ${cmd[*]} rejects the rendered configuration" "$printed"
  fi
  # The preStop hook and the helm test pod use subcommands and flags that must exist.
  mapfile -t prestop <"$out/prestop.txt"
  check "$name: preStop command parses (${prestop[*]:1})" "$bin" "${prestop[@]:1}" --help
  while IFS=$'\t' read -r -a hook; do
    [ ${#hook[@]} -eq 0 ] && continue
    check "$name: helm test command parses (${hook[*]})" "$bin" "${hook[@]}" --help
  done <"$out/hooks.txt"
done

rejects "schema: replicaCount < 1" "minimum: got 0, want 1" --set replicaCount=0
rejects "schema: wrong type" "got string, want integer" --set replicaCount=three
rejects "schema: unknown key" "additional properties 'shardz' not allowed" --set shardz=8
rejects "schema: unknown nested key" "additional properties 'endpoint' not allowed" --set etcd.endpoint=x
rejects "schema: handler type" "value must be one of" --set handler.type=lambda
rejects "schema: etcd endpoint form" "etcd/endpoints/0" --set 'etcd.endpoints[0]=etcd'
rejects "template: grace period must exceed the drain" "must exceed drainTimeoutSeconds" \
  --set terminationGracePeriodSeconds=10 --set drainTimeoutSeconds=20
rejects "template: sidecar needs an image" "set handler.sidecar.image.repository" --set handler.type=sidecar
rejects "template: a Kafka source needs a dead-letter topic or onFailure: skip" "set dlqTopic" \
  --set 'kafka.sources[0].brokers=k:9092' --set 'kafka.sources[0].topics[0]=t'
rejects "schema: onFailure values" "value must be one of" \
  --set 'kafka.sources[0].brokers=k:9092' --set 'kafka.sources[0].topics[0]=t' \
  --set 'kafka.sources[0].onFailure=drop'
rejects "template: hpa and keda exclusive" "cannot both be enabled" \
  --set autoscaling.hpa.enabled=true --set autoscaling.keda.enabled=true \
  --set autoscaling.keda.kafka.bootstrapServers=k:9092 --set autoscaling.keda.kafka.consumerGroup=g \
  --set autoscaling.keda.kafka.topic=t

echo
result=ok
[ "$failed" -gt 0 ] && result=FAILED
echo "test result: $result. $passed passed; $failed failed; 0 ignored; 0 measured; 0 filtered out (helm chart)"
[ "$failed" -eq 0 ]
