#!/usr/bin/env bash
# Snapshot time of a populated 4 MiB volume against a populated 4 GiB one, through the
# CLI against a running node (the time the node reports for the snapshot, and the whole
# CLI round trip). Usage: bash bench/snap.sh [REPEATS]   (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
repeats="${1:-20}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/tandem-target}"
cargo build --release -q -p tandem
tandem="$CARGO_TARGET_DIR/release/tandem"
work=$(mktemp -d /var/tmp/tandem-snap.XXXXXX)
cleanup() { [ -n "${node_pid:-}" ] && kill "$node_pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
"$tandem" init --dir "$work/certs" --nodes bench >/dev/null
"$tandem" node --config "$work/certs/bench.toml" --data-dir "$work/data" \
  --listen 127.0.0.1:17200 --nbd 127.0.0.1:17811 --metrics 127.0.0.1:17901 >"$work/node.out" 2>"$work/node.err" &
node_pid=$!
for _ in $(seq 50); do grep -q serving "$work/node.out" 2>/dev/null && break; sleep 0.2; done
export TANDEM_ENDPOINT=127.0.0.1:17200 TANDEM_CERTS="$work/certs"
"$tandem" cluster init >/dev/null
"$tandem" volume create small --size 4MiB >/dev/null
"$tandem" volume create large --size 4GiB >/dev/null
# Populate every byte of both volumes.
head -c $((4 << 20)) /dev/urandom > "$work/small.raw"
nbdcopy "$work/small.raw" nbd://127.0.0.1:17811/small
head -c $((4 << 30)) /dev/urandom > "$work/large.raw"
nbdcopy "$work/large.raw" nbd://127.0.0.1:17811/large
rm -f "$work/large.raw"

snap_times() {
  local volume=$1
  for index in $(seq "$repeats"); do
    "$tandem" snap "$volume" "$volume-snap-$index" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["elapsed_micros"])'
  done | sort -n | python3 -c '
import sys
values = [int(line) for line in sys.stdin]
print(values[len(values) // 2], values[-1])'
}
read -r small_median small_max < <(snap_times small)
read -r large_median large_max < <(snap_times large)
echo "| volume | populated bytes | snap median µs | snap max µs |"
echo "|---|---|---|---|"
echo "| small | 4 MiB | $small_median | $small_max |"
echo "| large | 4 GiB | $large_median | $large_max |"
python3 -c "print(f'ratio large/small (median): {$large_median / max($small_median, 1):.2f}')"
