#!/usr/bin/env bash
# A real Apache Kafka broker (KRaft, one combined broker+controller) on 127.0.0.1 for tests and
# development. Jars come from Maven Central through scripts/kafka/pom.xml and are cached.
#
#   scripts/kafka.sh start [--fresh]   start (formatting new storage if there is none, or with --fresh);
#                                      waits until the broker answers a metadata request and
#                                      prints its bootstrap address
#   scripts/kafka.sh stop              stop it by PID (storage is kept)
#   scripts/kafka.sh restart           stop, then start on the same storage
#   scripts/kafka.sh status            running or not, and the address
#   scripts/kafka.sh bootstrap         print the bootstrap address
#
# A three-node KRaft cluster (each node broker and controller, replication factor 3,
# min.insync.replicas=2 for every topic, the transaction state log and the offsets topic
# included), for the cluster tests; fresh storage on every start:
#
#   scripts/kafka.sh cluster-start     start nodes 1-3, wait until all three answer; print the bootstrap list
#   scripts/kafka.sh cluster-stop      stop every node
#   scripts/kafka.sh cluster-kill N    SIGKILL node N (1-3)
#   scripts/kafka.sh cluster-node N    start node N again on its storage, wait until the cluster has three
#                                      and every partition's replicas are in sync
#   scripts/kafka.sh cluster-roles TXN TOPIC   print controller=<id> coordinator=<id> leaders=<p>:<id>,...
#
# Environment: BANDITFLOW_KAFKA_CLUSTER_PORT (default 29200, below the ephemeral port range
# where a client's socket could take a node's port: node N's broker listens on port+N, its
# controller on port+10+N).
#
# Environment: BANDITFLOW_KAFKA_DIR (cache and storage, default ~/.cache/banditflow/kafka),
# BANDITFLOW_KAFKA_PORT (default 39092; the controller listens on the next port). A second
# listener on port+2 advertises itself as port+3, where a fault proxy (scripts/toxiproxy.sh)
# forwards to it: clients bootstrapped through the proxy keep talking through it.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
base="${BANDITFLOW_KAFKA_DIR:-$HOME/.cache/banditflow/kafka}"
port="${BANDITFLOW_KAFKA_PORT:-39092}"
cport=$((port + 1))
fport=$((port + 2))
version="$(sed -n 's|.*<kafka.version>\(.*\)</kafka.version>.*|\1|p' "$here/kafka/pom.xml")"
jars="$base/jars-$version"
run="$base/run-$port"
pidfile="$run/broker.pid"
bootstrap="127.0.0.1:$port"

say() { printf 'kafka.sh: %s\n' "$*" >&2; }

fetch_jars() {
  [ -f "$jars/.complete" ] && return 0
  command -v mvn >/dev/null || { say "mvn is required to fetch the broker jars"; exit 1; }
  command -v java >/dev/null || { say "java (17+) is required to run the broker"; exit 1; }
  say "fetching Apache Kafka $version jars from Maven Central into $jars"
  rm -rf "$jars"
  mkdir -p "$jars"
  mvn -q -B -f "$here/kafka/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$jars" -DincludeScope=runtime
  touch "$jars/.complete"
}

running() {
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

write_config() {
  mkdir -p "$run/data"
  cat >"$run/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,FAULTY://127.0.0.1:$fport,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port,FAULTY://127.0.0.1:$((fport + 1))
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,FAULTY:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$run/data
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.cleaner.backoff.ms=1000
log.segment.bytes=16777216
# Keep every record until the storage is wiped (start --fresh): recordings carry old event
# timestamps, which time-based retention would delete at once.
log.retention.ms=-1
message.max.bytes=1048588
PROPS
}

java_opts() {
  printf '%s' "-Xms256m -Xmx512m -XX:+UseG1GC -Djava.awt.headless=true -Dorg.slf4j.simpleLogger.defaultLogLevel=warn"
}

start() {
  local fresh=0
  [ "${1:-}" = "--fresh" ] && fresh=1
  fetch_jars
  if running; then
    say "already running (pid $(cat "$pidfile"))"
    echo "$bootstrap"
    return 0
  fi
  if [ $fresh = 1 ]; then rm -rf "$run"; fi
  if [ -f "$run/data/meta.properties" ]; then
    # Storage kept; the properties are rewritten (listeners added since it was formatted).
    write_config
  else
    rm -rf "$run"
    write_config
    local id
    id="$(java -cp "$jars/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)"
    java -cp "$jars/*" kafka.tools.StorageTool format --standalone -t "$id" -c "$run/server.properties" >"$run/format.log" 2>&1 \
      || { say "formatting storage failed:"; cat "$run/format.log" >&2; exit 1; }
  fi
  # shellcheck disable=SC2046
  nohup java $(java_opts) -cp "$jars/*" kafka.Kafka "$run/server.properties" >>"$run/broker.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  if ! java -Dorg.slf4j.simpleLogger.defaultLogLevel=warn -cp "$jars/*" "$here/kafka/Ready.java" "$bootstrap" 90 >"$run/ready.log" 2>&1; then
    say "broker did not answer a metadata request within 90 s; last log lines:"
    tail -n 30 "$run/broker.log" >&2
    stop || true
    exit 1
  fi
  say "$(grep "^ready" "$run/ready.log") (pid $(cat "$pidfile"), log $run/broker.log)"
  echo "$bootstrap"
}

stop() {
  if ! running; then
    rm -f "$pidfile"
    say "not running"
    return 0
  fi
  local pid
  pid="$(cat "$pidfile")"
  kill "$pid"
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "broker did not stop within 30 s; killing it"
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  say "stopped"
}

cluster_port="${BANDITFLOW_KAFKA_CLUSTER_PORT:-29200}"
cluster_run="$base/cluster-$cluster_port"
cluster_bootstrap="127.0.0.1:$((cluster_port + 1)),127.0.0.1:$((cluster_port + 2)),127.0.0.1:$((cluster_port + 3))"

node_config() {
  local n="$1" dir="$cluster_run/node-$1"
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=$n
controller.quorum.voters=1@127.0.0.1:$((cluster_port + 11)),2@127.0.0.1:$((cluster_port + 12)),3@127.0.0.1:$((cluster_port + 13))
listeners=PLAINTEXT://127.0.0.1:$((cluster_port + n)),CONTROLLER://127.0.0.1:$((cluster_port + 10 + n))
advertised.listeners=PLAINTEXT://127.0.0.1:$((cluster_port + n))
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
num.partitions=1
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
unclean.leader.election.enable=false
log.cleaner.backoff.ms=1000
log.segment.bytes=16777216
log.retention.ms=-1
message.max.bytes=1048588
PROPS
}

node_running() {
  local f="$cluster_run/node-$1/broker.pid"
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

node_start() {
  local n="$1" dir="$cluster_run/node-$1"
  node_running "$n" && return 0
  # shellcheck disable=SC2046
  nohup java $(java_opts) -cp "$jars/*" kafka.Kafka "$dir/server.properties" >>"$dir/broker.log" 2>&1 </dev/null &
  echo $! >"$dir/broker.pid"
}

cluster_ready() {
  if ! java -Dorg.slf4j.simpleLogger.defaultLogLevel=warn -cp "$jars/*" "$here/kafka/Ready.java" "$cluster_bootstrap" 120 3 \
      >"$cluster_run/ready.log" 2>&1; then
    say "the cluster did not have three brokers within 120 s:"
    cat "$cluster_run/ready.log" >&2
    exit 1
  fi
}

cluster_start() {
  fetch_jars
  cluster_stop >/dev/null 2>&1 || true
  rm -rf "$cluster_run"
  local id
  id="$(java -cp "$jars/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)"
  for n in 1 2 3; do
    node_config "$n"
    java -cp "$jars/*" kafka.tools.StorageTool format -t "$id" -c "$cluster_run/node-$n/server.properties" \
      >"$cluster_run/node-$n/format.log" 2>&1 \
      || { say "formatting node $n failed:"; cat "$cluster_run/node-$n/format.log" >&2; exit 1; }
  done
  for n in 1 2 3; do node_start "$n"; done
  cluster_ready
  say "cluster: $(grep '^ready' "$cluster_run/ready.log")"
  echo "$cluster_bootstrap"
}

cluster_stop() {
  for n in 1 2 3; do
    local f="$cluster_run/node-$n/broker.pid"
    [ -f "$f" ] || continue
    kill -9 "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  say "cluster stopped"
}

case "${1:-}" in
  cluster-start) cluster_start ;;
  cluster-stop) cluster_stop ;;
  cluster-kill)
    f="$cluster_run/node-${2:?node}/broker.pid"
    [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
    say "node $2 killed" ;;
  cluster-node)
    node_start "${2:?node}"
    cluster_ready
    # Back means back in sync: the next kill must not take the cluster below min.insync.replicas.
    java -Dorg.slf4j.simpleLogger.defaultLogLevel=warn -cp "$jars/*" "$here/kafka/InSync.java" "$cluster_bootstrap" 180 >&2 \
      || { say "node $2 did not get back in sync"; exit 1; }
    say "node $2 back and in sync" ;;
  cluster-roles)
    java -Dorg.slf4j.simpleLogger.defaultLogLevel=warn -cp "$jars/*" "$here/kafka/Roles.java" "$cluster_bootstrap" "${2:?txn id}" "${3:?topic}" ;;
  start) shift; start "$@" ;;
  stop) stop ;;
  restart) stop; start ;;
  status)
    if running; then echo "running (pid $(cat "$pidfile")) at $bootstrap"; else echo "not running"; exit 1; fi ;;
  bootstrap) echo "$bootstrap" ;;
  *) sed -n '2,30p' "$0" >&2; exit 2 ;;
esac
