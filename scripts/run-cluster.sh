#!/usr/bin/env bash
# TPC-H on a Ballista cluster of separate OS processes on this machine: one scheduler
# (`cluster-scheduler`, over the ballista-scheduler library) and two `governed-executor`s, each
# on its own memory governor. Writes the tables with tpchgen, runs the 22 queries through
# `SessionContext::remote` (checking each against single-process DataFusion), prints each
# executor's governor peak, and stops every process it started, also on failure or Ctrl-C.
#
#   scripts/run-cluster.sh [--sf 0.1] [--query-limit 64M] [--vcores 2] [--data DIR]
#                          [--ballista-pool-size 64M]   # baseline: Ballista's own pools
#
# Ports: scheduler 50050, executors 50061/50062 (Flight), 50071/50072 (gRPC), 9101/9102
# (metrics); CLUSTER_PORT_BASE=N moves them all by N.
set -euo pipefail
cd "$(dirname "$0")/.."

sf=0.1
query_limit=64M
vcores=2
data=""
baseline=""
while [ $# -gt 0 ]; do
    case "$1" in
        --sf) sf="$2"; shift 2 ;;
        --query-limit) query_limit="$2"; shift 2 ;;
        --vcores) vcores="$2"; shift 2 ;;
        --data) data="$2"; shift 2 ;;
        --ballista-pool-size) baseline="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run-cluster: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

scripts/setup.sh
echo "== building the cluster binaries (ballista-governor, debug)"
(cd ballista-governor && cargo build --bins)
target="${CARGO_TARGET_DIR:-$PWD/ballista-governor/target}"
bin="$target/debug"

work="$(mktemp -d -t run-cluster.XXXXXX)"
data="${data:-$work/data}"
pids=()
cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$status" -ne 0 ]; then
        echo "run-cluster: failed (exit $status); process logs:" >&2
        for log in "$work"/*.log; do
            [ -f "$log" ] && { echo "--- $log" >&2; tail -n 20 "$log" >&2; }
        done
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

base="${CLUSTER_PORT_BASE:-0}"
scheduler_port=$((50050 + base))

# Waits until something listens on 127.0.0.1:$1, or fails when process $3 exits or after a
# generous deadline.
wait_port() {
    local port="$1" what="$2" pid="$3" deadline=$((SECONDS + 120))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "run-cluster: $what exited before listening on port $port" >&2
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "run-cluster: $what did not listen on port $port within 120 s" >&2
            return 1
        fi
        sleep 0.2
    done
}

echo "== TPC-H SF $sf in $data"
"$bin/tpch-cluster" --data "$data" --sf "$sf" --generate-only

echo "== scheduler on 127.0.0.1:$scheduler_port"
"$bin/cluster-scheduler" --bind-host 127.0.0.1 --bind-port "$scheduler_port" \
    >"$work/scheduler.log" 2>&1 &
pids+=($!)
wait_port "$scheduler_port" scheduler "${pids[0]}"

for i in 1 2; do
    flight=$((50060 + i + base))
    grpc=$((50070 + i + base))
    metrics=$((9100 + i + base))
    pool_args=(--query-limit "$query_limit")
    [ -n "$baseline" ] && pool_args=(--ceiling "$baseline" --ballista-pool-size "$baseline")
    [ -z "$baseline" ] && pool_args+=(--ceiling "$query_limit")
    echo "== executor $i: Flight $flight, metrics http://127.0.0.1:$metrics/metrics ${baseline:+(baseline: Ballista pools of $baseline)}"
    "$bin/governed-executor" --id "executor-$i" --bind-host 127.0.0.1 --external-host 127.0.0.1 \
        --scheduler-host 127.0.0.1 --scheduler-port "$scheduler_port" \
        --bind-port "$flight" --bind-grpc-port "$grpc" --vcores "$vcores" \
        --work-dir "$work/executor-$i" --metrics-port "$metrics" "${pool_args[@]}" \
        >"$work/executor-$i.out" 2>"$work/executor-$i.log" &
    pids+=($!)
done
for i in 1 2; do wait_port $((50060 + i + base)) "executor $i" "${pids[$i]}"; done

echo "== TPC-H on the cluster"
status=0
"$bin/tpch-cluster" --scheduler "127.0.0.1:$scheduler_port" --data "$data" --verify || status=$?

# Stop the executors first: each prints its governor's peaks as it exits.
for i in 1 2; do kill -TERM "${pids[$i]}" 2>/dev/null || true; wait "${pids[$i]}" 2>/dev/null || true; done
for i in 1 2; do
    echo "executor $i $(grep '^governor:' "$work/executor-$i.out" || echo 'governor: (no summary)')"
done
exit "$status"
