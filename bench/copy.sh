#!/usr/bin/env bash
# Copy benchmarks of issue 4, every peer run in this one script on this machine:
#  1. a full copy of a volume to another node (a mirror establish, standard on node alpha,
#     BCV on node beta, both on loopback) against nbdcopy between two qemu-nbd exports,
#     a raw TCP stream of the same bytes (socat), and a local disk copy (dd, fsync);
#  2. an incremental resync after 1 % of the tracks changed at random: mirror reestablish
#     against rsync --inplace --no-whole-file of the two images, with wire bytes (tandem:
#     the loopback interface's transmitted bytes during the resync, headers included;
#     rsync: its own count of bytes sent and received) against the changed bytes;
#  3. fio 4k randwrite QD1 p99 on the standard, idle and during a copy with the default
#     QoS (no --rate: the latency governor sets the copy's rate);
#  4. 4k write latency on a standard with a synchronized sync mirror on the other node,
#     against the same writes to a volume without a mirror.
#
# Usage: bash bench/copy.sh [SIZE_GIB]   (default 4)
# Prints markdown tables; docs/BENCHMARKS.md holds a recorded run.
set -euo pipefail
cd "$(dirname "$0")/.."
size_gib="${1:-4}"
size_bytes=$((size_gib << 30))
track_bytes=$((64 << 10))
for tool in fio qemu-nbd nbdcopy socat rsync python3; do
  command -v "$tool" >/dev/null || { echo "bench/copy.sh needs $tool (apt-get install -y qemu-utils libnbd-bin fio socat rsync)" >&2; exit 1; }
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/tandem-target}"
cargo build --release -q -p tandem
tandem="$CARGO_TARGET_DIR/release/tandem"
work=$(mktemp -d /var/tmp/tandem-copy-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$tandem" init --dir "$work/certs" --nodes alpha,beta >/dev/null
start_node() { # name quic nbd metrics extra...
  local name=$1 quic=$2 nbd=$3 metrics=$4; shift 4
  "$tandem" node --config "$work/certs/$name.toml" --data-dir "$work/$name" \
    --listen "127.0.0.1:$quic" --nbd "127.0.0.1:$nbd" --metrics "127.0.0.1:$metrics" "$@" \
    >"$work/$name.out" 2>"$work/$name.err" &
  pids+=($!)
  for _ in $(seq 100); do grep -q serving "$work/$name.out" 2>/dev/null && return; sleep 0.1; done
  echo "node $name did not start" >&2; exit 1
}
export TANDEM_ENDPOINT=127.0.0.1:18100 TANDEM_CERTS="$work/certs"
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
start_node alpha 18100 18800 18900 --control-plane
"$tandem" cluster init >/dev/null
wait_registered alpha
start_node beta 18101 18801 18901 --members 127.0.0.1:18100
wait_registered beta
"$tandem" volume create std --node alpha --size "$size_bytes" >/dev/null
"$tandem" volume create plain --node alpha --size 1GiB >/dev/null
"$tandem" volume create bcv --node beta --size "$size_bytes" >/dev/null
"$tandem" volume create bcv2 --node beta --size "$size_bytes" >/dev/null
std_uri=nbd://127.0.0.1:18800/std

seconds() { python3 -c "import time; print(time.monotonic())"; }
elapsed() { python3 -c "print(f'{$2 - $1:.2f}')"; }
mib_per_second() { python3 -c "print(f'{$1 / 2**20 / $2:.0f}')"; }
lo_bytes() { awk '/^ *lo:/ {print $10}' /proc/net/dev; }

# The source data: incompressible, written once, identical on every side.
head -c "$size_bytes" /dev/urandom >"$work/source.raw"
nbdcopy "$work/source.raw" "$std_uri"

echo "## Full copy of $size_gib GiB to another node"
echo
start=$(seconds)
"$tandem" mirror establish std bcv --rate 100000 --wait --json >/dev/null
tandem_seconds=$(elapsed "$start" "$(seconds)")

truncate -s "$size_bytes" "$work/qemu-target.raw"
qemu-nbd -f raw --cache=writeback --aio=threads --shared=4 --persistent -x src -b 127.0.0.1 -p 18810 "$work/source.raw" & pids+=($!)
qemu-nbd -f raw --cache=writeback --aio=threads --shared=4 --persistent -x dst -b 127.0.0.1 -p 18811 "$work/qemu-target.raw" & pids+=($!)
sleep 1
start=$(seconds)
nbdcopy nbd://127.0.0.1:18810/src nbd://127.0.0.1:18811/dst
sync
nbdcopy_seconds=$(elapsed "$start" "$(seconds)")

socat -u TCP-LISTEN:18820,reuseaddr OPEN:"$work/tcp-target.raw",creat,trunc & listener=$!
sleep 0.5
start=$(seconds)
socat -u OPEN:"$work/source.raw" TCP:127.0.0.1:18820
wait "$listener"
sync
tcp_seconds=$(elapsed "$start" "$(seconds)")

start=$(seconds)
dd if="$work/source.raw" of="$work/local-copy.raw" bs=1M conv=fsync status=none
local_seconds=$(elapsed "$start" "$(seconds)")
rm -f "$work/tcp-target.raw" "$work/qemu-target.raw"

slower=$(python3 -c "print(max($tcp_seconds, $local_seconds))")
echo "| copy | seconds | MiB/s | tandem ÷ it (throughput) |"
echo "|---|---|---|---|"
for row in "tandem mirror establish (QUIC, node to node)|$tandem_seconds" "nbdcopy between two qemu-nbd|$nbdcopy_seconds" "raw TCP stream (socat)|$tcp_seconds" "local disk copy (dd, fsync)|$local_seconds"; do
  name=${row%%|*}; secs=${row#*|}
  echo "| $name | $secs | $(mib_per_second "$size_bytes" "$secs") | $(python3 -c "print(f'{$secs / $tandem_seconds:.2f}')") |"
done
echo
echo "tandem against the slower of raw TCP and local copy: $(python3 -c "print(f'{$slower / $tandem_seconds:.2f}')")× (goal ≥ 0.8×)"
echo

echo "## Incremental resync after 1 % of the tracks changed"
echo
"$tandem" mirror split bcv >/dev/null
changed_tracks=$((size_bytes / track_bytes / 100))
# The same random 64 KiB writes (same seed) to the standard and to the raw image.
for target in "--ioengine=nbd --uri=$std_uri" "--ioengine=psync --filename=$work/source.raw"; do
  # shellcheck disable=SC2086
  fio --name=change $target --rw=randwrite --bs=64k --size="$size_bytes" \
    --io_size=$((changed_tracks * track_bytes)) --randseed=42 --refill_buffers \
    --output-format=terse >/dev/null
done
changed_bytes=$((changed_tracks * track_bytes))
before=$(lo_bytes)
start=$(seconds)
"$tandem" mirror reestablish bcv --rate 100000 --wait --json >"$work/resync.json"
tandem_seconds=$(elapsed "$start" "$(seconds)")
tandem_wire=$(( $(lo_bytes) - before ))
tandem_tracks=$(python3 -c "import json; print(json.load(open('$work/resync.json'))['tracks_copied_last'])")
start=$(seconds)
rsync --inplace --no-whole-file --stats "$work/source.raw" "$work/local-copy.raw" >"$work/rsync.txt"
rsync_seconds=$(elapsed "$start" "$(seconds)")
rsync_wire=$(python3 - "$work/rsync.txt" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
sent = int(re.search(r"Total bytes sent: ([\d,]+)", text).group(1).replace(",", ""))
received = int(re.search(r"Total bytes received: ([\d,]+)", text).group(1).replace(",", ""))
print(sent + received)
PY
)
echo "| resync | seconds | tracks copied | wire bytes | wire ÷ changed |"
echo "|---|---|---|---|---|"
echo "| tandem mirror reestablish | $tandem_seconds | $tandem_tracks of $changed_tracks changed | $tandem_wire | $(python3 -c "print(f'{$tandem_wire / $changed_bytes:.3f}')") |"
echo "| rsync --inplace --no-whole-file | $rsync_seconds | – | $rsync_wire | $(python3 -c "print(f'{$rsync_wire / $changed_bytes:.3f}')") |"
echo
echo "tandem is $(python3 -c "print(f'{$rsync_seconds / $tandem_seconds:.1f}')")× faster than rsync (goal ≥ 20×); changed bytes $changed_bytes"
echo

fio_p99() { # uri extra...
  local uri=$1; shift
  fio --name=p99 --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=1 --size=1G \
    --time_based --runtime=20 --ramp_time=2 --randrepeat=0 "$@" --output-format=json --output="$work/fio.json" >/dev/null
  python3 - "$work/fio.json" <<'PY'
import json, sys
write = json.load(open(sys.argv[1]))["jobs"][0]["write"]
percentiles = write["clat_ns"]["percentile"]
print(f'{percentiles["50.000000"] / 1000:.0f} {percentiles["99.000000"] / 1000:.0f} {write["iops"]:.0f}')
PY
}

echo "## Host writes during a copy with the default QoS (no --rate)"
echo
"$tandem" mirror split bcv >/dev/null
read -r idle_p50 idle_p99 idle_iops < <(fio_p99 "$std_uri")
"$tandem" mirror establish std bcv2 --json >/dev/null
read -r busy_p50 busy_p99 busy_iops < <(fio_p99 "$std_uri")
copied=$("$tandem" mirror show bcv2 --json | python3 -c "import json,sys; print(json.load(sys.stdin)['tracks_copied_last'])")
echo "| standard, 4k randwrite QD1 | p50 µs | p99 µs | IOPS |"
echo "|---|---|---|---|"
echo "| idle | $idle_p50 | $idle_p99 | $idle_iops |"
echo "| during the copy ($copied tracks, $((copied * track_bytes >> 20)) MiB, copied in the 22 s) | $busy_p50 | $busy_p99 | $busy_iops |"
echo
echo "p99 during the copy ÷ idle: $(python3 -c "print(f'{$busy_p99 / max($idle_p99, 1):.2f}')") (goal ≤ 1.5)"
echo

echo "## Sync mirror write latency"
echo
"$tandem" mirror cancel bcv2 >/dev/null
"$tandem" mirror reestablish bcv --rate 100000 --wait --json >/dev/null
read -r mirror_p50 mirror_p99 mirror_iops < <(fio_p99 "$std_uri")
read -r plain_p50 plain_p99 plain_iops < <(fio_p99 nbd://127.0.0.1:18800/plain)
echo "| 4k randwrite QD1 | p50 µs | p99 µs | IOPS |"
echo "|---|---|---|---|"
echo "| no mirror | $plain_p50 | $plain_p99 | $plain_iops |"
echo "| sync mirror on another node | $mirror_p50 | $mirror_p99 | $mirror_iops |"
echo
echo "sync mirror ÷ no mirror: p50 $(python3 -c "print(f'{$mirror_p50 / max($plain_p50, 1):.2f}')")×, p99 $(python3 -c "print(f'{$mirror_p99 / max($plain_p99, 1):.2f}')")×"
