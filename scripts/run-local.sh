#!/usr/bin/env bash
# `make run`: a local etcd and a 3-instance Leasehold cluster on loopback with the
# built-in echo handler. Sends a few calls through different instances, prints where to
# look, and stops everything on Ctrl-C.
set -euo pipefail

bin="${LEASEHOLD_BIN:?set LEASEHOLD_BIN to the leasehold binary}"
work="$(mktemp -d /tmp/leasehold-run.XXXXXX)"
pids=()

stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping (SIGTERM: instances drain, then exit)"
  # Instances first (they drain through etcd), etcd last.
  for pid in "${pids[@]:1}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]:1}"; do wait "$pid" 2>/dev/null || true; done
  kill -TERM "${pids[0]}" 2>/dev/null || true
  wait "${pids[0]}" 2>/dev/null || true
  rm -rf "$work"
}
trap stop INT TERM EXIT

echo "work dir: $work"
# setsid: Ctrl-C reaches only this script, which stops the others in order.
setsid etcd --name run --data-dir "$work/etcd" \
  --listen-client-urls http://127.0.0.1:12379 --advertise-client-urls http://127.0.0.1:12379 \
  --listen-peer-urls http://127.0.0.1:12380 --initial-advertise-peer-urls http://127.0.0.1:12380 \
  --initial-cluster run=http://127.0.0.1:12380 >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -fsS http://127.0.0.1:12379/health >/dev/null 2>&1 && break
  sleep 0.1
done

for i in 0 1 2; do
  setsid "$bin" serve --id "node-$i" --cluster demo --etcd http://127.0.0.1:12379 \
    --listen "127.0.0.1:1707$i" --admin-listen "127.0.0.1:1717$i" >"$work/node-$i.log" 2>&1 &
  pids+=($!)
done

echo "waiting for the cluster to own every shard"
for _ in $(seq 200); do
  if curl -fsS http://127.0.0.1:17170/v1/cluster 2>/dev/null | grep -q '"unowned_shards":0[,}]' &&
     curl -fsS http://127.0.0.1:17170/v1/cluster | grep -q '"members":3'; then
    break
  fi
  sleep 0.1
done

echo
"$bin" status --admin http://127.0.0.1:17170
echo "calls through different instances (each runs at the key's owner):"
for i in 0 1 2; do
  for key in alice bob carol; do
    "$bin" call --addr "127.0.0.1:1707$i" --key "$key" --payload "hello $key via node-$i"
  done
done

cat <<EOT

Leasehold is running:
  gRPC (Entities, Admin, health, reflection)  127.0.0.1:17070  127.0.0.1:17071  127.0.0.1:17072
  admin HTTP                                   http://127.0.0.1:17170/v1/cluster  /v1/shards  /v1/members  /metrics
  status table                                 $bin status --admin http://127.0.0.1:17170
  one call                                     $bin call --addr 127.0.0.1:17071 --key alice --payload hi
  drain a member                               curl -X POST http://127.0.0.1:17170/v1/members/node-2/drain
  logs                                         $work/*.log

Ctrl-C stops everything.
EOT
if [ -n "${LEASEHOLD_RUN_ONCE:-}" ]; then exit 0; fi
wait "${pids[0]}"
