#!/usr/bin/env bash
# Copy benchmarks (issues 4 and 11), every peer run in this one script on this machine.
# Node alpha (the control-plane member) holds the standard, node beta the BCVs, both on
# loopback. Sections, in the order they run:
#  full    a full copy of the standard to another node (a mirror establish) against
#          nbdcopy between two qemu-nbd exports, a raw TCP stream of the same bytes
#          (socat), and a local disk copy (dd, fsync);
#  resync  an incremental resync after 1 % of the tracks changed at random: mirror
#          reestablish against rsync --inplace --no-whole-file of the two images, with wire
#          bytes (tandem: the loopback interface's transmitted bytes during the resync,
#          headers included; rsync: its own count of bytes sent and received);
#  qos     fio 4k randwrite QD1 p99 on the standard with a synchronized async mirror
#          attached and idle, against the same during a full copy to a second BCV with
#          the default QoS (no --rate: the latency governor sets the copy's rate); the
#          copy's progress in that window against its progress in a window with the host
#          idle; and a volume of the same node without any session, so the session's own
#          cost shows. ROUNDS rounds back to back; the tables give every round and the
#          medians;
#  sync    4k write latency on a standard with a synchronized sync mirror on the other
#          node, against the same writes to a volume without a mirror;
#  loss    4k write latency on that standard while the BCV's node is killed (kill -9)
#          and started again: before, during and after the loss window.
#
# Usage: bash bench/copy.sh [SIZE_GIB]   (default 4)
# Environment: SECTIONS (default "full resync qos sync loss"), ROUNDS (qos rounds,
# default 3), FIO_SECONDS (each qos measurement, default 10, after a 2 s ramp),
# TANDEM_BINARY (a built tandem binary to use instead of building this tree), QOS_RATES
# (fixed copy rates in MiB/s to measure host p99 against, after the rounds; default none).
# Prints markdown tables; docs/BENCHMARKS.md holds a recorded run.
set -euo pipefail
cd "$(dirname "$0")/.."
size_gib="${1:-4}"
size_bytes=$((size_gib << 30))
track_bytes=$((64 << 10))
sections=" ${SECTIONS:-full resync qos sync loss} "
rounds="${ROUNDS:-3}"
fio_seconds="${FIO_SECONDS:-10}"
ramp_seconds=2
for tool in fio qemu-nbd nbdcopy socat rsync python3; do
  command -v "$tool" >/dev/null || { echo "bench/copy.sh needs $tool (apt-get install -y qemu-utils libnbd-bin fio socat rsync)" >&2; exit 1; }
done
if [ -n "${TANDEM_BINARY:-}" ]; then
  tandem=$TANDEM_BINARY
else
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/tandem-target}"
  cargo build --release -q -p tandem
  tandem="$CARGO_TARGET_DIR/release/tandem"
fi
work=$(mktemp -d /var/tmp/tandem-copy-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
wants() { [[ "$sections" == *" $1 "* ]]; }

"$tandem" init --dir "$work/certs" --nodes alpha,beta >/dev/null
# shellcheck source=bench/lib.sh
source bench/lib.sh
export TANDEM_ENDPOINT=127.0.0.1:18100 TANDEM_CERTS="$work/certs"
start_beta() { start_node beta 18101 18801 --metrics 127.0.0.1:18901 --members 127.0.0.1:18100; beta_pid=$node_pid; }
start_node alpha 18100 18800 --metrics 127.0.0.1:18900 --control-plane
"$tandem" cluster init >/dev/null
wait_registered alpha
start_beta
wait_registered beta
"$tandem" volume create std --node alpha --size "$size_bytes" >/dev/null
"$tandem" volume create plain --node alpha --size 1GiB >/dev/null
"$tandem" volume create bcv --node beta --size "$size_bytes" >/dev/null
"$tandem" volume create bcv2 --node beta --size "$size_bytes" >/dev/null
std_uri=nbd://127.0.0.1:18800/std
plain_uri=nbd://127.0.0.1:18800/plain

lo_bytes() { awk '/^ *lo:/ {print $10}' /proc/net/dev; }
median() { python3 -c "import statistics, sys; print(f'{statistics.median(float(v) for v in sys.argv[1:]):.0f}')" "$@"; }
ratio() { python3 -c "print(f'{$1 / max($2, 1e-9):.2f}')"; }

# The source data: incompressible, written once, identical on every side. The volume
# without a session holds the same first GiB, which is all the latency jobs touch.
head -c "$size_bytes" /dev/urandom >"$work/source.raw"
nbdcopy "$work/source.raw" "$std_uri"
head -c $((1 << 30)) "$work/source.raw" | nbdcopy - "$plain_uri"

# The mirror std -> bcv in the given mode, established (a full copy) if it is not yet;
# sets established_seconds to the seconds the establish took, or to nothing.
bcv_mode=none
mirror_bcv() { # mode
  established_seconds=
  [ "$bcv_mode" = "$1" ] && return
  [ "$bcv_mode" != none ] && "$tandem" mirror cancel bcv >/dev/null
  local start
  start=$(seconds)
  "$tandem" mirror establish std bcv --mode "$1" --rate 100000 --wait --json >/dev/null
  bcv_mode=$1
  established_seconds=$(elapsed "$start" "$(seconds)")
}

if wants full; then
  echo "## Full copy of $size_gib GiB to another node"
  echo
  mirror_bcv async
  tandem_seconds=$established_seconds

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
fi

if wants resync; then
  echo "## Incremental resync after 1 % of the tracks changed"
  echo
  [ -f "$work/local-copy.raw" ] || cp "$work/source.raw" "$work/local-copy.raw"
  mirror_bcv async
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
fi

# Prints "p50-µs p99-µs IOPS" of fio 4k randwrite QD1 on a volume.
fio_p99() { # uri extra...
  local uri=$1; shift
  fio --name=p99 --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=1 --size=1G \
    --time_based --runtime="$fio_seconds" --ramp_time="$ramp_seconds" --randrepeat=0 "$@" \
    --output-format=json --output="$work/fio.json" >/dev/null
  python3 - "$work/fio.json" <<'PY'
import json, sys
write = json.load(open(sys.argv[1]))["jobs"][0]["write"]
percentiles = write["clat_ns"]["percentile"]
print(f'{percentiles["50.000000"] / 1000:.0f} {percentiles["99.000000"] / 1000:.0f} {write["iops"]:.0f}')
PY
}
# The tracks a mirror's current copy has moved so far.
tracks_copied() { # bcv
  "$tandem" mirror show "$1" --json | python3 -c "import json, sys; print(json.load(sys.stdin)['tracks_copied_last'])"
}

if wants qos; then
  echo "## Host writes during a copy with the default QoS (no --rate)"
  echo
  mirror_bcv async
  window_seconds=$((fio_seconds + ramp_seconds))
  echo "Each round, back to back: fio on a volume without a session; fio on the standard with"
  echo "its async mirror synchronized (idle); fio on the standard while a full copy to a second"
  echo "BCV runs with the default QoS; that copy's tracks in the fio's $window_seconds s; the same"
  echo "copy's tracks in $window_seconds s with the host idle."
  echo
  echo "| round | no session p50/p99 µs, IOPS | mirror idle p50/p99 µs, IOPS | during the copy p50/p99 µs, IOPS | p99 copy ÷ idle | copy MiB with fio | copy MiB host idle | copy with fio ÷ host idle |"
  echo "|---|---|---|---|---|---|---|---|"
  none_p99s=() idle_p99s=() busy_p99s=() busy_mibs=() quiet_mibs=() p99_ratios=() copy_ratios=()
  for round in $(seq "$rounds"); do
    read -r none_p50 none_p99 none_iops < <(fio_p99 "$plain_uri")
    read -r idle_p50 idle_p99 idle_iops < <(fio_p99 "$std_uri")
    "$tandem" mirror establish std bcv2 --mode async --json >/dev/null
    read -r busy_p50 busy_p99 busy_iops < <(fio_p99 "$std_uri")
    busy_mib=$(( $(tracks_copied bcv2) * track_bytes >> 20 ))
    "$tandem" mirror cancel bcv2 >/dev/null
    "$tandem" mirror establish std bcv2 --mode async --json >/dev/null
    sleep "$window_seconds"
    quiet_mib=$(( $(tracks_copied bcv2) * track_bytes >> 20 ))
    "$tandem" mirror cancel bcv2 >/dev/null
    p99_ratio=$(ratio "$busy_p99" "$idle_p99")
    copy_ratio=$(ratio "$busy_mib" "$quiet_mib")
    none_p99s+=("$none_p99") idle_p99s+=("$idle_p99") busy_p99s+=("$busy_p99")
    busy_mibs+=("$busy_mib") quiet_mibs+=("$quiet_mib") p99_ratios+=("$p99_ratio") copy_ratios+=("$copy_ratio")
    echo "| $round | $none_p50 / $none_p99, $none_iops | $idle_p50 / $idle_p99, $idle_iops | $busy_p50 / $busy_p99, $busy_iops | $p99_ratio | $busy_mib | $quiet_mib | $copy_ratio |"
  done
  median_ratio() { python3 -c "import statistics, sys; print(f'{statistics.median(float(v) for v in sys.argv[1:]):.2f}')" "$@"; }
  echo
  echo "Medians over $rounds rounds: p99 no session $(median "${none_p99s[@]}") µs, mirror idle $(median "${idle_p99s[@]}") µs, during the copy $(median "${busy_p99s[@]}") µs;"
  echo "p99 during the copy ÷ mirror idle **$(median_ratio "${p99_ratios[@]}")** (goal ≤ 1.5); mirror idle ÷ no session $(ratio "$(median "${idle_p99s[@]}")" "$(median "${none_p99s[@]}")");"
  echo "copy with fio $(median "${busy_mibs[@]}") MiB, host idle $(median "${quiet_mibs[@]}") MiB in $window_seconds s: **$(median_ratio "${copy_ratios[@]}")** (goal ≥ 0.25)"
  echo
  if [ -n "${QOS_RATES:-}" ]; then
    # The trade-off the default QoS navigates: host p99 against fixed copy rates.
    echo "| copy --rate MiB/s | mirror idle p99 µs | during the copy p50/p99 µs, IOPS | p99 ÷ idle | copy MiB in $window_seconds s |"
    echo "|---|---|---|---|---|"
    for rate in $QOS_RATES; do
      read -r _ idle_p99 _ < <(fio_p99 "$std_uri")
      "$tandem" mirror establish std bcv2 --mode async --rate "$rate" --json >/dev/null
      read -r busy_p50 busy_p99 busy_iops < <(fio_p99 "$std_uri")
      busy_mib=$(( $(tracks_copied bcv2) * track_bytes >> 20 ))
      "$tandem" mirror cancel bcv2 >/dev/null
      echo "| $rate | $idle_p99 | $busy_p50 / $busy_p99, $busy_iops | $(ratio "$busy_p99" "$idle_p99") | $busy_mib |"
    done
    echo
  fi
fi

if wants sync; then
  echo "## Sync mirror write latency"
  echo
  mirror_bcv sync
  sync_seconds=$established_seconds
  [ -n "$sync_seconds" ] && echo "(the sync mirror's establish, a full copy of $size_gib GiB: $sync_seconds s, $(mib_per_second "$size_bytes" "$sync_seconds") MiB/s)" && echo
  read -r mirror_p50 mirror_p99 mirror_iops < <(fio_p99 "$std_uri")
  read -r plain_p50 plain_p99 plain_iops < <(fio_p99 "$plain_uri")
  echo "| 4k randwrite QD1 | p50 µs | p99 µs | IOPS |"
  echo "|---|---|---|---|"
  echo "| no mirror | $plain_p50 | $plain_p99 | $plain_iops |"
  echo "| sync mirror on another node | $mirror_p50 | $mirror_p99 | $mirror_iops |"
  echo
  echo "sync mirror ÷ no mirror: p50 $(ratio "$mirror_p50" "$plain_p50")×, p99 $(ratio "$mirror_p99" "$plain_p99")×"
  echo
fi

if wants loss; then
  echo "## Sync mirror writes while the BCV's node is lost"
  echo
  mirror_bcv sync
  before_seconds=5 loss_seconds=10 after_seconds=10
  # Every write's completion time and latency (fio logs the writes that succeeded);
  # failed writes are counted by fio, which goes on after them.
  fio --name=loss --ioengine=nbd --uri="$std_uri" --rw=randwrite --bs=4k --iodepth=1 --size=1G \
    --time_based --runtime=$((before_seconds + loss_seconds + after_seconds)) --randrepeat=0 \
    --continue_on_error=all --write_lat_log="$work/loss" --log_avg_msec=0 --log_unix_epoch=1 \
    --output-format=json --output="$work/loss.json" >/dev/null &
  fio_pid=$!
  sleep "$before_seconds"
  killed_ms=$(date +%s%3N)
  kill -9 "$beta_pid"
  sleep "$loss_seconds"
  restarted_ms=$(date +%s%3N)
  start_beta
  wait "$fio_pid" || true
  python3 - "$work/loss_clat.1.log" "$work/loss.json" "$killed_ms" "$restarted_ms" <<'PY'
import json, statistics, sys
log, result, killed, restarted = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
phases = {"before the loss": [], "node lost (kill -9 to restart)": [], "after the restart": []}
names = list(phases)
for line in open(log):
    fields = [field.strip() for field in line.split(",")]
    # A write that completed at `end` after `latency` was sent at `end - latency`: it
    # belongs to the phase it was sent in.
    end_ms, latency_us = int(fields[0]), int(fields[1]) / 1000
    sent = end_ms - latency_us / 1000
    phase = names[0] if sent < killed else names[1] if sent < restarted else names[2]
    phases[phase].append(latency_us)
job = json.load(open(result))["jobs"][0]
errors = job.get("total_err", 0)
print("| 4k randwrite QD1, sync mirror | writes | p50 µs | p99 µs | max µs |")
print("|---|---|---|---|---|")
for name, latencies in phases.items():
    if latencies:
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"| {name} | {len(latencies)} | {statistics.median(latencies):.0f} | {p99:.0f} | {latencies[-1]:.0f} |")
    else:
        print(f"| {name} | 0 | – | – | – |")
print()
first = job.get("first_error", 0)
print(f"failed writes: {errors}" + (f" (first error: errno {first})" if errors else "") + f"; the node was lost for {(restarted - killed) / 1000:.1f} s")
PY
  echo
fi
