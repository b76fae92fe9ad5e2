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
  [tls-secrets]="ci/tls-secrets-values.yaml"
)
# Cases whose planes use TLS (dev-etcd-hpa turns it off).
declare -A tls=([default]=1 [all-options]=1 [dev-etcd-hpa]=0 [tls-secrets]=1)

# has_doc KIND NAME FILE: the rendered FILE has a KIND named NAME.
has_doc() {
  awk -v kind="kind: $1" -v name="  name: $2" 'BEGIN { RS = "\n---\n" }
    index("\n" $0 "\n", "\n" kind "\n") && index("\n" $0 "\n", "\n" name "\n") { found = 1 }
    END { exit !found }' "$3"
}

# uses_tls DIR: the three probes are HTTPS, the preStop hook dials https:// with a CA, and
# both helm test commands dial https:// with a CA.
uses_tls() {
  [ "$(grep -c '^              scheme: HTTPS$' "$1/manifests.yaml")" = 3 ] &&
    grep -q '^https://127.0.0.1:' "$1/prestop.txt" && grep -qx -- --ca-file "$1/prestop.txt" &&
    [ "$(grep -c -- $'\t--addr\thttps://' "$1/hooks.txt")" = 2 ] &&
    [ "$(grep -c -- $'\t--ca-file\t' "$1/hooks.txt")" = 2 ]
}

for name in default all-options dev-etcd-hpa tls-secrets; do
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
    peer=$(sed -n 's/^peer_listen = "0.0.0.0:\([0-9]*\)"$/\1/p' "$out/config.toml")
    if [ -n "$peer" ] && grep -qx "peer_listen = \"0.0.0.0:$peer\"" <<<"$printed" &&
       grep -qx "peer_advertise = \"10.0.0.1:$peer\"" <<<"$printed"; then
      ok "$name: effective config listens and advertises the peer port ($peer, pod IP)"
    else
      fail "$name: effective config lacks the chart's peer_listen/peer_advertise" "$printed"
    fi
    if [ "${tls[$name]}" = 1 ]; then
      if grep -q '^tls_cert = "/etc/leasehold/tls/client/tls.crt"$' <<<"$printed" &&
         grep -q '^peer_cert = ' <<<"$printed" && grep -q '^admin_tls_cert = ' <<<"$printed"; then
        ok "$name: effective config has TLS on the client, peer and admin planes"
      else
        fail "$name: effective config lacks the chart's TLS settings" "$printed"
      fi
    elif grep -q '^tls_cert = \|^peer_cert = \|^admin_tls_cert = ' <<<"$printed"; then
      fail "$name: TLS is off but the effective config has certificates" "$printed"
    else
      ok "$name: effective config is plaintext, as the values say"
    fi
    if [ "$name" = all-options ]; then
      if grep -qx 'otlp_endpoint = "http://otel-collector.observability:4317"' <<<"$printed" &&
         grep -qx 'forward_metadata = \["x-tenant", "x-request-id"\]' <<<"$printed"; then
        ok "$name: effective config exports traces and forwards the listed metadata"
      else
        fail "$name: effective config lacks the chart's tracing settings" "$printed"
      fi
    elif grep -q '^otlp_endpoint = ' <<<"$printed"; then
      fail "$name: tracing is off but the effective config exports" "$printed"
    fi
    if [ "$name" = all-options ]; then
      want_balance='balance = "load"|balance_tolerance = 15|load_report_interval = "5s"|load_smoothing = "20s"'
    else
      want_balance='balance = "count"|balance_tolerance = 10|load_report_interval = "10s"|load_smoothing = "30s"'
    fi
    if [ "$(grep -cxE "$want_balance" <<<"$printed")" = 4 ]; then
      ok "$name: effective config balances as placement.* says ($(grep -x 'balance = .*' <<<"$printed"))"
    else
      fail "$name: effective config lacks the chart's placement settings" "$printed"
    fi
    if grep -q '^admin_token_file = "/etc/leasehold/token/token"$' <<<"$printed"; then
      ok "$name: effective config has the admin token file"
    else
      fail "$name: effective config lacks admin_token_file" "$printed"
    fi
  else
    fail "$name: leasehold ${cmd[*]} rejects the rendered configuration" "$printed"
  fi
  # Every ${env:NAME} of the config (Kafka secretProperties) is set in the container.
  missing=""
  for var in $(grep -o '\${env:[A-Za-z0-9_]*}' "$out/config.toml" | sed 's/^\${env:\(.*\)}$/\1/' | sort -u); do
    grep -q "^$var=" "$out/env.txt" || missing+=" $var"
  done
  if [ -z "$missing" ]; then
    ok "$name: every \${env:...} of the config is in the container's environment"
  else
    fail "$name: config references unset variables:$missing" "$(cat "$out/env.txt")"
  fi
  if [ "${tls[$name]}" = 1 ]; then
    check "$name: probes, preStop and helm test use TLS" uses_tls "$out"
  fi
  # The preStop hook and the helm test pod use subcommands and flags that must exist.
  mapfile -t prestop <"$out/prestop.txt"
  check "$name: preStop command parses (${prestop[*]:1})" "$bin" "${prestop[@]:1}" --help
  while IFS=$'\t' read -r -a hook; do
    [ ${#hook[@]} -eq 0 ] && continue
    check "$name: helm test command parses (${hook[*]})" "$bin" "${hook[@]}" --help
  done <"$out/hooks.txt"
done

out="$work/default/manifests.yaml"
check "default: a cert-manager Certificate t-leasehold-peer (the peer identity)" has_doc Certificate t-leasehold-peer "$out"
self_signed_chain() {
  has_doc Issuer t-leasehold-selfsigned "$1" && has_doc Certificate t-leasehold-ca "$1" &&
    has_doc Issuer t-leasehold-ca "$1"
}
check "default: the self-signed CA chain (Issuer t-leasehold-selfsigned, Certificate and Issuer t-leasehold-ca)" \
  self_signed_chain "$out"
check "default: a generated admin token Secret" has_doc Secret t-leasehold-admin-token "$out"
check "default: the Deployment sets LEASEHOLD_PEER_ADVERTISE to the pod IP and peer port" \
  grep -qx 'LEASEHOLD_PEER_ADVERTISE=10.0.0.1:7072' "$work/default/env.txt"
check "tls-secrets: no cert-manager resources (Secrets you manage)" \
  bash -c '! grep -q "^apiVersion: cert-manager.io/" "$1"' - "$work/tls-secrets/manifests.yaml"
check "tls-secrets: the admin token Secret is generated" \
  has_doc Secret t-leasehold-admin-token "$work/tls-secrets/manifests.yaml"
check "all-options: no generated token Secret (adminAuth.tokenSecret names one)" \
  bash -c '! grep -q "^kind: Secret$" "$1"' - "$work/all-options/manifests.yaml"
check "all-options: Certificates from the ClusterIssuer, no release CA" bash -c \
  '[ "$(grep -c "^    kind: ClusterIssuer$" "$1")" = 3 ] && ! grep -q "^kind: Issuer$" "$1"' - "$work/all-options/manifests.yaml"
check "all-options: Kafka passwords come from Secrets, not the ConfigMap" bash -c \
  'grep -qxF "\"sasl.password\" = \"\${env:KAFKA_SECRET_0_0}\"" "$1/config.toml" &&
   grep -qxF "KAFKA_SECRET_0_0=secret-password" "$1/env.txt"' - "$work/all-options"

# The HTTP gateway: off by default; on, the instance listens, the pod and the client
# Service expose it and the network policy admits clients to it.
check "default: no HTTP gateway" bash -c '! grep -q "http_listen" "$1/config.toml"' - "$work/default"
gateway_on() {
  local service deployment policy
  # Captured first: `grep -q` in a pipeline may close it early (SIGPIPE under pipefail).
  service=$(doc Service orders "$1/manifests.yaml") &&
    deployment=$(doc Deployment orders "$1/manifests.yaml") &&
    policy=$(doc NetworkPolicy orders "$1/manifests.yaml") &&
    grep -qx 'http_listen = "0.0.0.0:8088"' "$1/config.toml" &&
    grep -qx '    - name: http' <<<"$service" &&
    grep -qx '              containerPort: 8088' <<<"$deployment" &&
    grep -qx '        - port: http' <<<"$policy"
}

# Monitoring: the ServiceMonitor, the Grafana dashboard ConfigMap and the PrometheusRule.
# doc KIND NAME FILE: prints the rendered FILE's KIND named NAME.
doc() {
  awk -v kind="kind: $1" -v name="  name: $2" 'BEGIN { RS = "\n---\n" }
    index("\n" $0 "\n", "\n" kind "\n") && index("\n" $0 "\n", "\n" name "\n") { print; found = 1 }
    END { exit !found }' "$3"
}
check "all-options: the HTTP gateway listens and is exposed (pod, Service, NetworkPolicy)" \
  gateway_on "$work/all-options"
# selects_peers FILE FULLNAME: the ServiceMonitor selects the headless -peers Service
# (every pod, ready or not, with the admin port), not the client Service.
selects_peers() {
  local sm peers
  sm=$(doc ServiceMonitor "$2" "$1") && peers=$(doc Service "$2-peers" "$1") &&
    grep -qx '      app.kubernetes.io/component: peers' <<<"$sm" && ! grep -q 'component: api' <<<"$sm" &&
    grep -qx '  publishNotReadyAddresses: true' <<<"$peers" && grep -qx '    - name: admin' <<<"$peers"
}
for name in all-options dev-etcd-hpa tls-secrets; do
  fullname=t-leasehold
  [ "$name" = all-options ] && fullname=orders
  check "$name: the ServiceMonitor selects the -peers Service (each pod once, ready or not)" \
    selects_peers "$work/$name/manifests.yaml" "$fullname"
done
# no_admin_on_clients FILE FULLNAME: the client Service (a LoadBalancer, maybe) has no
# admin port; the -peers Service has it.
no_admin_on_clients() {
  local service
  service=$(doc Service "$2" "$1") && grep -qx '    - name: grpc' <<<"$service" &&
    ! grep -q 'name: admin' <<<"$service"
}
for name in default all-options; do
  fullname=t-leasehold
  [ "$name" = all-options ] && fullname=orders
  check "$name: the client Service has no admin port" no_admin_on_clients "$work/$name/manifests.yaml" "$fullname"
done
no_monitoring() { ! has_doc ConfigMap t-leasehold-dashboard "$1" && ! grep -q '^kind: PrometheusRule$' "$1"; }
check "default: no Grafana dashboard ConfigMap and no PrometheusRule" no_monitoring "$work/default/manifests.yaml"

out="$work/all-options/manifests.yaml"
# dashboard_configmap FILE NAME NAMESPACE: the ConfigMap NAME carries the sidecar's label
# and goes to NAMESPACE.
dashboard_configmap() {
  local cm
  cm=$(doc ConfigMap "$2" "$1") && grep -qx '    grafana_dashboard: "1"' <<<"$cm" &&
    grep -qx "  namespace: $3" <<<"$cm"
}
# dashboard_json FILE NAME: the leasehold.json of the ConfigMap NAME, unindented.
dashboard_json() {
  doc ConfigMap "$2" "$1" | awk '$0 == "  leasehold.json: |-" { on = 1; next }
    on && /^    / { print substr($0, 5); next } { on = 0 }'
}
# dashboard_valid FILE NAME: the dashboard is JSON (json.load) that Grafana provisions as
# uid leasehold, with its variables and distinct panel ids.
dashboard_valid() {
  dashboard_json "$1" "$2" | python3 -c 'import json, sys
d = json.load(sys.stdin)
assert (d["uid"], d["title"], d["schemaVersion"]) == ("leasehold", "Leasehold", 39), "uid, title, schemaVersion"
v = {x["name"]: x for x in d["templating"]["list"]}
assert (v["datasource"]["type"], v["datasource"]["query"]) == ("datasource", "prometheus"), "datasource variable"
assert {"namespace", "job"} <= set(v), "namespace and job variables"
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), "panel ids repeat"'
}
# dashboard_queries FILE NAME METRIC...: some panel expression mentions each METRIC.
dashboard_queries() {
  local file=$1 name=$2
  shift 2
  dashboard_json "$file" "$name" | python3 -c 'import json, re, sys
exprs = " ".join(t["expr"] for p in json.load(sys.stdin)["panels"] for t in p.get("targets", []))
missing = [m for m in sys.argv[1:] if not re.search(r"\b" + m + r"\b", exprs)]
sys.exit("no panel queries " + " ".join(missing) if missing else 0)' "$@"
}
dashboard_metrics=(leasehold_calls_total leasehold_forwards_total leasehold_handler_duration_seconds_bucket
  leasehold_grpc_requests_total leasehold_grpc_request_duration_seconds_bucket leasehold_shards_owned
  leasehold_unowned_shards leasehold_is_leader leasehold_assignment_version leasehold_lease_slack_seconds
  leasehold_handoff_duration_seconds_bucket leasehold_kafka_lag leasehold_kafka_handled_total
  leasehold_kafka_dead_lettered_total leasehold_tls_certificate_expiry_seconds
  process_resident_memory_bytes process_cpu_seconds_total)
check "all-options: the dashboard ConfigMap carries grafana_dashboard: \"1\", in the sidecar's namespace" \
  dashboard_configmap "$out" orders-dashboard monitoring
check "all-options: the dashboard JSON parses (uid leasehold, schemaVersion 39, datasource/namespace/job variables)" \
  dashboard_valid "$out" orders-dashboard
check "all-options: the dashboard's panels query all ${#dashboard_metrics[@]} metrics" \
  dashboard_queries "$out" orders-dashboard "${dashboard_metrics[@]}"

alerts=(LeaseholdUnownedShards LeaseholdInstanceNotReady LeaseholdLeaseSlackLow LeaseholdKafkaLagGrowing
  LeaseholdDeadLetters LeaseholdNoLeader LeaseholdCertificateExpiringSoon)
# has_alerts FILE NAME: the PrometheusRule NAME has every alert of the chart.
has_alerts() {
  local rule a
  rule=$(doc PrometheusRule "$2" "$1") || return 1
  for a in "${alerts[@]}"; do
    grep -qx "        - alert: $a" <<<"$rule" || { echo "no alert $a"; return 1; }
  done
}
# alerts_annotated FILE NAME: each of the chart's alerts has a severity label and summary,
# description and runbook_url annotations.
alerts_annotated() {
  doc PrometheusRule "$2" "$1" | awk -v want="${#alerts[@]}" '
    function check() { n++; if (seen !~ / severity:/ || seen !~ / summary:/ || seen !~ / description:/ || seen !~ / runbook_url:/) { print name " has only" seen; bad = 1 } }
    /^        - / { if (name != "") check(); name = ""; seen = "" }
    /^        - alert: Leasehold/ { name = $3 }
    name != "" && /^            (severity|summary|description|runbook_url): / { seen = seen " " $1 }
    END { if (name != "") check(); exit bad || n != want }'
}
# rule_selectors FILE FULLNAME: every metric selector of the alerts is the labels the
# ServiceMonitor gives its targets: the release's namespace and job <fullname>-peers.
rule_selectors() {
  local sels
  sels=$(doc PrometheusRule "$2" "$1" | grep -oE 'leasehold_[a-z_]+\{[^}]*\}' | sed 's/^[a-z_]*//' | sort -u)
  echo "$sels"
  [ "$sels" = "{namespace=\"default\", job=\"$2-peers\"}" ] && has_doc Service "$2-peers" "$1"
}
# runbooks FILE NAME BASE: each alert's runbook_url is BASE#alert-<name in lower case>, and
# the README has the heading "#### Alert: <name>" that anchor points at.
runbooks() {
  local rule a
  rule=$(doc PrometheusRule "$2" "$1") || return 1
  for a in "${alerts[@]}"; do
    grep -qx "            runbook_url: $3#alert-${a,,}" <<<"$rule" || { echo "$a: no runbook_url $3#alert-${a,,}"; return 1; }
    grep -qx "#### Alert: $a" ../README.md || { echo "README.md: no heading '#### Alert: $a'"; return 1; }
  done
}
check "all-options: the PrometheusRule has every alert (${alerts[*]})" has_alerts "$out" orders
check "all-options: every alert has a severity and summary, description and runbook_url" alerts_annotated "$out" orders
check "all-options: the alerts select namespace and job=orders-peers, as the ServiceMonitor labels targets" \
  rule_selectors "$out" orders
check "all-options: each runbook_url points at the alert's heading in README.md" \
  runbooks "$out" orders https://runbooks.example.com/leasehold
check "all-options: LeaseholdLeaseSlackLow fires under a fifth of the lease TTL (2s of 10s)" \
  grep -qE '^            leasehold_lease_slack_seconds\{[^}]*\} < 2$' "$out"
check "all-options: additionalRules join the group" grep -qx '          record: leasehold:calls:rate5m' "$out"

rejects "schema: replicaCount < 1" "minimum: got 0, want 1" --set replicaCount=0
rejects "schema: wrong type" "got string, want integer" --set replicaCount=three
rejects "schema: unknown key" "additional properties 'shardz' not allowed" --set shardz=8
rejects "schema: unknown nested key" "additional properties 'endpoint' not allowed" --set etcd.endpoint=x
rejects "schema: handler type" "value must be one of" --set handler.type=lambda
rejects "schema: tracing endpoint is a URL" "tracing/otlpEndpoint" --set tracing.otlpEndpoint=collector:4317
rejects "schema: forwarded metadata keys are lower case" "tracing/forwardMetadata/0" --set 'tracing.forwardMetadata[0]=X-Tenant'
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
rejects "template: TLS without cert-manager needs Secrets" "set tls.secrets" --set tls.certManager.enabled=false
rejects "template: some TLS Secrets missing" "set tls.secrets" --set tls.certManager.enabled=false \
  --set tls.secrets.client=c --set tls.secrets.peer=p
rejects "template: issuerRef needs a name" "issuerRef: set name" --set tls.certManager.issuerRef.kind=ClusterIssuer
rejects "template: clientAuth needs TLS" "tls.clientAuth needs tls.enabled" \
  --set tls.enabled=false --set tls.clientAuth=true
rejects "template: one port per plane" "must differ" --set ports.peer=7071
rejects "template: the HTTP gateway has its own port" "httpGateway.port (7070) must differ" \
  --set httpGateway.enabled=true --set httpGateway.port=7070
rejects "schema: adminAuth.protect values" "value must be one of" --set adminAuth.protect=reads
rejects "schema: unknown tls key" "additional properties 'clientCA' not allowed" --set tls.clientCA=x
rejects "template: Kafka password in plain properties" "is a password: move it to kafka.sources[0].secretProperties" \
  --set 'kafka.sources[0].brokers=k:9092' --set 'kafka.sources[0].topics[0]=t' \
  --set 'kafka.sources[0].onFailure=skip' --set 'kafka.sources[0].properties.sasl\.password=hunter2'
rejects "template: Kafka key password in plain properties" "is a password: move it to kafka.sources[0].secretProperties" \
  --set 'kafka.sources[0].brokers=k:9092' --set 'kafka.sources[0].topics[0]=t' \
  --set 'kafka.sources[0].onFailure=skip' --set 'kafka.sources[0].properties.ssl\.key\.password=hunter2'
rejects "schema: secretProperties need a key" "missing property 'key'" \
  --set 'kafka.sources[0].brokers=k:9092' --set 'kafka.sources[0].topics[0]=t' \
  --set 'kafka.sources[0].onFailure=skip' --set 'kafka.sources[0].secretProperties.sasl\.password.secretName=s'
rejects "template: https etcd needs etcd.tls" "set etcd.tls.secretName" --set 'etcd.endpoints[0]=https://etcd:2379'
rejects "template: etcd TLS needs https endpoints" "must use https://" --set etcd.tls.secretName=etcd-tls
rejects "schema: unknown grafanaDashboard key" "additional properties 'label' not allowed" \
  --set metrics.grafanaDashboard.label=x
rejects "schema: runbookBaseUrl is a URL" "metrics/prometheusRule/runbookBaseUrl" \
  --set metrics.prometheusRule.runbookBaseUrl=runbooks
rejects "schema: additionalRules need an expr" "missing property 'expr'" \
  --set 'metrics.prometheusRule.additionalRules[0].alert=X'

echo
result=ok
[ "$failed" -gt 0 ] && result=FAILED
echo "test result: $result. $passed passed; $failed failed; 0 ignored; 0 measured; 0 filtered out (helm chart)"
[ "$failed" -eq 0 ]
