#!/usr/bin/env bash
# Control-plane benchmarks on loopback, three member processes:
#  1. catalog commit latency (no-op commands, one at a time, through the leader), against
#     a one-member cluster in the same script: the ratio is the cost of replication;
#  2. leader failover: kill -9 the leader, then time from the kill to the first command
#     committed through a new leader, KILLS times (default 20); the killed member is
#     restarted and caught up before the next kill.
# Usage: bash bench/control-plane.sh [KILLS] [COMMANDS]   (defaults 20 and 2000)
set -euo pipefail
cd "$(dirname "$0")/.."
kills="${1:-20}"
commands="${2:-2000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/tandem-target}"
cargo build --release -q -p tandem
tandem="$CARGO_TARGET_DIR/release/tandem"
work=$(mktemp -d /var/tmp/tandem-control-plane.XXXXXX)
declare -A pids ports
cleanup() { for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
names=(member-a member-b member-c)
"$tandem" init --dir "$work/certs" --nodes member-a,member-b,member-c,solo >/dev/null
export TANDEM_CERTS="$work/certs"
ports=([member-a]=17310 [member-b]=17311 [member-c]=17312 [solo]=17313)
members="127.0.0.1:17310,127.0.0.1:17311,127.0.0.1:17312"

start() {
  local name=$1
  : >"$work/$name.out"
  "$tandem" node --config "$work/certs/$name.toml" --data-dir "$work/data/$name" --control-plane \
    --members "$members" --listen "127.0.0.1:${ports[$name]}" --nbd 127.0.0.1:0 --metrics "127.0.0.1:$((ports[$name] + 100))" \
    >"$work/$name.out" 2>"$work/$name.err" &
  pids[$name]=$!
  for _ in $(seq 100); do grep -q serving "$work/$name.out" 2>/dev/null && return; sleep 0.1; done
  echo "node $name did not start" >&2; exit 1
}
at() { TANDEM_ENDPOINT="127.0.0.1:${ports[$1]}" "${@:2}"; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
leader() { at "$1" "$tandem" cluster status --json | json '["leader"]'; }
registered() { at "$1" "$tandem" status --json 2>/dev/null | grep -q "\"name\":\"$2\""; }

# The peer: a one-member cluster.
start solo
at solo "$tandem" cluster init >/dev/null
solo_latency=$(at solo "$tandem" debug noop --count "$commands")
kill "${pids[solo]}"; unset 'pids[solo]'

# Three members.
for name in "${names[@]}"; do start "$name"; done
at member-a "$tandem" cluster init >/dev/null
for name in "${names[@]}"; do
  for _ in $(seq 100); do registered member-a "$name" && break; sleep 0.1; done
done
at member-a "$tandem" cluster add-member member-b >/dev/null
at member-a "$tandem" cluster add-member member-c >/dev/null
trio_latency=$(at member-a "$tandem" debug noop --count "$commands")

# Failover.
failovers=()
for round in $(seq "$kills"); do
  old=$(leader member-a 2>/dev/null || leader member-b)
  survivor=member-a; [ "$old" = member-a ] && survivor=member-b
  kill -9 "${pids[$old]}"
  started=$(date +%s%N)
  RUST_LOG=info at "$survivor" "$tandem" debug noop >/dev/null 2>"$work/cli.err"
  finished=$(date +%s%N)
  failovers+=($(( (finished - started) / 1000000 )))
  wait "${pids[$old]}" 2>/dev/null || true
  start "$old"
  # Wait until the restarted member has caught up, so every round starts with three.
  for _ in $(seq 200); do
    lags=$(at "$survivor" "$tandem" cluster status --json | json '["members"]' || true)
    echo "$lags" | grep -q "None" || break
    sleep 0.1
  done
  echo "round $round: killed $old (survivor $survivor), committed through the new leader after ${failovers[-1]} ms" >&2
  if [ -n "${TANDEM_BENCH_KEEP_SLOW:-}" ] && [ "${failovers[-1]}" -gt 1000 ]; then
    mkdir -p "$TANDEM_BENCH_KEEP_SLOW/round-$round"; cp "$work"/*.err "$TANDEM_BENCH_KEEP_SLOW/round-$round/"
  fi
done

python3 - "$solo_latency" "$trio_latency" "${failovers[@]}" <<'PYTHON'
import json, sys
solo, trio = json.loads(sys.argv[1]), json.loads(sys.argv[2])
failovers = sorted(int(value) for value in sys.argv[3:])
def percentile(values, fraction):
    import math
    return values[max(1, math.ceil(len(values) * fraction)) - 1]
print("| measurement | one member (peer) | three members | ratio |")
print("|---|---|---|---|")
for key in ("p50_ms", "p99_ms"):
    print(f"| catalog commit {key[:3]} (ms, {trio['count']} no-ops, CLI to leader) | {solo[key]:.2f} | {trio[key]:.2f} | {trio[key] / solo[key]:.2f}× |")
print()
print(f"| leader failover over {len(failovers)} kill -9 | median | p99 | max |")
print("|---|---|---|---|")
print(f"| kill to first commit through the new leader (ms) | {percentile(failovers, 0.5)} | {percentile(failovers, 0.99)} | {failovers[-1]} |")
PYTHON
