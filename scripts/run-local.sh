#!/usr/bin/env bash
# `make run`: the seed scenario on loopback. A local etcd, an Apache Kafka broker
# (KRaft), the demo ledger application (an EntityHandler doing read-modify-write on
# balance files, a store without transactions) and 3 Leasehold instances consuming a
# 6-partition topic of null-keyed payments. Sends calls through different instances,
# produces payments, shows the totals add up — and that without Leasehold they do not.
# Ctrl-C stops everything.
set -euo pipefail

bin="${LEASEHOLD_BIN:?set LEASEHOLD_BIN to the leasehold binary}"
demo="${LEASEHOLD_DEMO_BIN:?set LEASEHOLD_DEMO_BIN to the leasehold-demo binary}"
libs="${LEASEHOLD_KAFKA_LIBS:-$HOME/.cache/leasehold/kafka/libs}"
payments="${PAYMENTS:-20000}"
work="$(mktemp -d /tmp/leasehold-run.XXXXXX)"
pids=()

stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping (SIGTERM: instances drain, then exit)"
  # Instances and the app first (they drain through etcd and commit to Kafka), then
  # Kafka and etcd.
  for pid in "${pids[@]:3}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]:3}"; do wait "$pid" 2>/dev/null || true; done
  for pid in "${pids[1]}" "${pids[2]}" "${pids[0]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
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

mkdir -p "$work/kafka"
cat >"$work/kafka/server.properties" <<EOP
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:19093
listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093
advertised.listeners=PLAINTEXT://127.0.0.1:19092
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$work/kafka/data
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
EOP
java -cp "$libs/*" kafka.tools.StorageTool format -t leasehold-run-00000001 -c "$work/kafka/server.properties" >/dev/null 2>&1
setsid java -Xms256m -Xmx512m -cp "$libs/*" kafka.Kafka "$work/kafka/server.properties" >"$work/kafka.log" 2>&1 &
pids+=($!)
echo "waiting for Kafka"
for _ in $(seq 120); do
  java -cp "$libs/*" org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:19092 \
    --create --if-not-exists --topic payments --partitions 6 >/dev/null 2>&1 && break
  sleep 0.5
done

setsid "$demo" app --listen 127.0.0.1:19000 --store "$work/ledger" >"$work/ledger.log" 2>&1 &
pids+=($!)

for i in 0 1 2; do
  setsid "$bin" serve --id "node-$i" --cluster demo --etcd http://127.0.0.1:12379 \
    --listen "127.0.0.1:1707$i" --admin-listen "127.0.0.1:1717$i" \
    --handler grpc://127.0.0.1:19000 --kafka-brokers 127.0.0.1:19092 --kafka-topic payments \
    --kafka-group ledger --kafka-key json:/account >"$work/node-$i.log" 2>&1 &
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
echo "gRPC calls through different instances (each runs at the key's owner):"
for i in 0 1 2; do
  for key in alice bob carol; do
    "$bin" call --addr "127.0.0.1:1707$i" --key "$key" --payload "{\"account\":\"$key\",\"amount\":0}"
  done
done

echo
echo "Kafka: $payments payments of 1 with null keys over 20 accounts, 6 partitions, 3 instances"
"$demo" produce --brokers 127.0.0.1:19092 --topic payments --messages "$payments"
for _ in $(seq 600); do
  if "$demo" check --store "$work/ledger" --expected "$payments" 2>/dev/null | grep -q "no update lost"; then break; fi
  sleep 0.2
done
echo -n "with Leasehold:    "
"$demo" check --store "$work/ledger" --expected "$payments"
echo -n "without Leasehold: "
"$demo" direct --brokers 127.0.0.1:19092 --topic payments --store "$work/ledger-direct" --consumers 3 --messages "$payments"
"$demo" check --store "$work/ledger-direct" --expected "$payments"

cat <<EOT

Leasehold is running:
  gRPC (Entities, Admin, health, reflection)  127.0.0.1:17070  127.0.0.1:17071  127.0.0.1:17072
  admin HTTP                                   http://127.0.0.1:17170/v1/cluster  /v1/shards  /v1/members  /metrics
  status table                                 $bin status --admin http://127.0.0.1:17170
  one call                                     $bin call --addr 127.0.0.1:17071 --key alice --payload '{"account":"alice","amount":5}'
  drain a member                               curl -X POST http://127.0.0.1:17170/v1/members/node-2/drain
  Kafka                                        127.0.0.1:19092, topic payments (6 partitions), group ledger
  the ledger (balance files)                   $work/ledger
  metrics of the Kafka source                  curl -s http://127.0.0.1:17170/metrics | grep kafka
  logs                                         $work/*.log

Ctrl-C stops everything.
EOT
if [ -n "${LEASEHOLD_RUN_ONCE:-}" ]; then exit 0; fi
wait "${pids[0]}"
