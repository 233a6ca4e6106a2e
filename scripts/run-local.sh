#!/usr/bin/env bash
# Starts a local odin-ws: ws-shard with SHARDS shards and the demo feed, and ws-lb in front
# of them. Ctrl-C (or SIGTERM) drains and stops both. If either process exits on its own
# (a port in use, a bad setting), the other is stopped too and the script exits with the
# first one's status, so nothing is left running behind a failed `make run`.
set -uo pipefail

# Arguments, not environment: LB_* and WS_* variables are the binaries' settings.
bin=${1:-target/release}
shards=${2:-3}
base=${3:-3002}
lb_port=${4:-3001}

backends=()
for ((i = 0; i < shards; i++)); do
    backends+=("ws://127.0.0.1:$((base + i))/ws")
done
urls=$(IFS=,; echo "${backends[*]}")

lb_pid=
stop() {
    local status=${1:-0}
    trap - INT TERM
    kill -TERM $lb_pid "$shard_pid" 2>/dev/null
    wait $lb_pid "$shard_pid" 2>/dev/null
    exit "$status"
}

# Wait until every port accepts, as long as process $1 lives (bash's /dev/tcp: no curl needed).
wait_ports() {
    local pid=$1; shift
    local deadline=$((SECONDS + 60)) port
    for port in "$@"; do
        until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
            if ! kill -0 "$pid" 2>/dev/null; then
                wait "$pid"; local status=$?
                echo "run-local: a process exited (status $status) during start-up" >&2
                stop "$((status == 0 ? 1 : status))"
            fi
            if ((SECONDS > deadline)); then
                echo "run-local: port $port did not accept within 60 s" >&2
                stop 1
            fi
            sleep 0.05
        done
    done
}

"$bin/ws-shard" --shards "$shards" --base-port "$base" --demo-feed --drain-window 1s &
shard_pid=$!
trap 'stop 0' INT TERM
# ws-lb starts once every shard listens, and the banner appears once ws-lb listens: a
# client that connects as soon as it reads "running" is served, not closed with 1012.
shard_ports=()
for ((i = 0; i < shards; i++)); do shard_ports+=("$((base + i))"); done
wait_ports "$shard_pid" "${shard_ports[@]}"
"$bin/ws-lb" --listen "127.0.0.1:$lb_port" --backend-urls "$urls" --drain-window 1s &
lb_pid=$!
wait_ports "$lb_pid" "$lb_port"

cat <<MSG

  odin-ws is running.
    clients:      ws://127.0.0.1:$lb_port/ws        (LB health: http://127.0.0.1:$lb_port/health)
    shards:       ${backends[*]}
    metrics:      http://127.0.0.1:9101/metrics (ws-lb)   http://127.0.0.1:9102/metrics (ws-shard)
    publish:      curl -XPOST 127.0.0.1:9102/publish -H 'content-type: application/json' \\
                    -d '{"channel":"trades.BTC-USD","data":{"px":1}}'
    demo feed:    trades.BTC-USD trades.ETH-USD trades.SOL-USD book.BTC-USD book.ETH-USD book.SOL-USD
  Ctrl-C stops both.

MSG
wait -n "$lb_pid" "$shard_pid"
status=$?
echo "run-local: a process exited (status $status); stopping the other" >&2
stop "$((status == 0 ? 1 : status))"
