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

# A person's Ctrl-C is read as a key, not taken as a signal: make would die of that
# SIGINT too and end `make run` with an error after a clean stop. Ctrl-C (or q) is
# honoured at the next pause, and the terminal's signals come back while stopping, so a
# second Ctrl-C still interrupts a stop that hangs.
tty_state=""
if [ -t 0 ]; then
  tty_state="$(stty -g)"
  # No signals from keys, no line buffering, no echo; a read waits at most 0.1 s. (bash's
  # own `read -n` turns signals back on while it reads, so keys are read with dd.)
  stty -isig -icanon -echo min 0 time 1
fi
pause() {
  if [ -z "$tty_state" ]; then
    sleep "$1"
    return
  fi
  local key tenths i
  tenths="$(awk -v s="$1" 'BEGIN { n = int(s * 10 + 0.5); print (n < 1 ? 1 : n) }')"
  for ((i = 0; i < tenths; i++)); do
    key="$(dd bs=1 count=1 2>/dev/null)"
    if [ "$key" = $'\x03' ] || [ "$key" = q ]; then stop 0; fi
  done
}

# Stops everything in order and exits with $1 (default: the status that brought us here).
stop() {
  local status="${1:-$?}"
  trap - INT TERM EXIT
  if [ -n "$tty_state" ]; then stty "$tty_state"; fi
  echo
  echo "stopping (SIGTERM: instances drain, then exit)"
  # Instances and the app first (they drain through etcd and commit to Kafka), then
  # Kafka and etcd.
  for pid in "${pids[@]:3}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]:3}"; do wait "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]:1:2}" "${pids[@]:0:1}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
  echo "stopped"
  exit "$status"
}
trap 'stop 0' INT TERM
trap stop EXIT

echo "work dir: $work"
# setsid: Ctrl-C reaches only this script, which stops the others in order.
setsid etcd --name run --data-dir "$work/etcd" \
  --listen-client-urls http://127.0.0.1:12379 --advertise-client-urls http://127.0.0.1:12379 \
  --listen-peer-urls http://127.0.0.1:12380 --initial-advertise-peer-urls http://127.0.0.1:12380 \
  --initial-cluster run=http://127.0.0.1:12380 >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -fsS http://127.0.0.1:12379/health >/dev/null 2>&1 && break
  pause 0.1
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
  pause 0.5
done
java -cp "$libs/*" org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:19092 \
  --create --if-not-exists --topic payments-dlq --partitions 1 >/dev/null 2>&1

setsid "$demo" app --listen 127.0.0.1:19000 --store "$work/ledger" >"$work/ledger.log" 2>&1 &
pids+=($!)

for i in 0 1 2; do
  setsid "$bin" serve --id "node-$i" --cluster demo --etcd http://127.0.0.1:12379 \
    --listen "127.0.0.1:1707$i" --admin-listen "127.0.0.1:1717$i" --peer-listen "127.0.0.1:1727$i" \
    --handler grpc://127.0.0.1:19000 --kafka-brokers 127.0.0.1:19092 --kafka-topic payments \
    --kafka-group ledger --kafka-key json:/account --kafka-dlq-topic payments-dlq >"$work/node-$i.log" 2>&1 &
  pids+=($!)
done

echo "waiting for the cluster to own every shard"
for _ in $(seq 200); do
  if curl -fsS http://127.0.0.1:17170/v1/cluster 2>/dev/null | grep -q '"unowned_shards":0[,}]' &&
     curl -fsS http://127.0.0.1:17170/v1/cluster | grep -q '"members":3'; then
    break
  fi
  pause 0.1
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
  pause 0.2
done
echo -n "with Leasehold:    "
"$demo" check --store "$work/ledger" --expected "$payments"
echo -n "without Leasehold: "
"$demo" direct --brokers 127.0.0.1:19092 --topic payments --store "$work/ledger-direct" --consumers 3 --messages "$payments"
"$demo" check --store "$work/ledger-direct" --expected "$payments"

cat <<EOT

Leasehold is running:
  status page (live; open it in a browser)     http://127.0.0.1:17170/   http://127.0.0.1:17171/   http://127.0.0.1:17172/
  gRPC clients (Entities, health, reflection)  127.0.0.1:17070  127.0.0.1:17071  127.0.0.1:17072
  admin (HTTP and the Admin gRPC service)      http://127.0.0.1:17170/v1/cluster  /v1/shards  /v1/members  /v1/kafka  /metrics
  status table                                 $bin status --admin http://127.0.0.1:17170
  one call                                     $bin call --addr 127.0.0.1:17071 --key alice --payload '{"account":"alice","amount":5}'
  drain a member                               curl -X POST http://127.0.0.1:17170/v1/members/node-2/drain
  Kafka                                        127.0.0.1:19092, topic payments (6 partitions), group ledger
  the ledger (balance files)                   $work/ledger
  metrics of the Kafka source                  curl -s http://127.0.0.1:17170/metrics | grep kafka
  logs                                         $work/*.log

Ctrl-C (or q) stops everything.
EOT
if [ -n "${LEASEHOLD_RUN_ONCE:-}" ]; then exit 0; fi
while kill -0 "${pids[0]}" 2>/dev/null; do pause 1; done
echo "etcd exited; see $work/etcd.log" >&2
exit 1
