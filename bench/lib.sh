# Shell functions the cluster benchmarks share (sourced by bench/copy.sh and
# bench/gsnap.sh after they set `tandem`, `work`, `pids` and TANDEM_ENDPOINT).

# Starts a node in the background from its sample config; its pid in node_pid. Waits
# until it serves. Arguments: name, QUIC port, NBD port, then more flags for `tandem node`.
start_node() {
  local name=$1 quic=$2 nbd=$3; shift 3
  : >"$work/$name.out"
  "$tandem" node --config "$work/certs/$name.toml" --data-dir "$work/$name" \
    --listen "127.0.0.1:$quic" --nbd "127.0.0.1:$nbd" "$@" \
    >>"$work/$name.out" 2>>"$work/$name.err" &
  pids+=($!)
  node_pid=$!
  for _ in $(seq 100); do grep -q serving "$work/$name.out" 2>/dev/null && return; sleep 0.1; done
  echo "node $name did not start" >&2; exit 1
}

# Waits until `tandem status` lists node $1.
wait_registered() {
  for _ in $(seq 200); do
    "$tandem" status --json 2>/dev/null | python3 -c "
import json, sys
status = json.load(sys.stdin)
sys.exit(0 if any(node['name'] == '$1' for nodes in status['sites'].values() for node in nodes) else 1)" && return
    sleep 0.1
  done
  echo "node $1 did not register" >&2; exit 1
}

# The clock read in the shell itself: a python3 here took 90 ms to start, and the second
# reading of every measured interval used to include that start (a 0.25 s resync showed
# as 0.35 s). Bash's wall clock, to the microsecond; an interval is seconds long at most
# minutes, so a clock step is unlikely to land in one.
seconds() { echo "$EPOCHREALTIME"; }
elapsed() { python3 -c "print(f'{$2 - $1:.2f}')"; }
mib_per_second() { python3 -c "print(f'{$1 / 2**20 / $2:.0f}')"; }
