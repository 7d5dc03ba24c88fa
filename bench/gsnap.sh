#!/usr/bin/env bash
# gsnap benchmarks (issue 12), every peer run in this one script on this machine. Node
# alpha (the control-plane member) holds P and P', node beta (another "site") holds S,
# both on loopback. Sections, in the order they run:
#  full   a SIZE_GIB gsnap P -> S, from the command to the verified report (`--wait`),
#         against nbdcopy between two qemu-nbd exports and a raw TCP stream of the same
#         bytes (socat), each synced at the end; with the job's own step times (the
#         copy, the verification's two digests) and the CPU seconds each node process
#         used, to say what bounds it;
#  delay  the same gsnap with 20 ms added to every call between the nodes (the node's
#         own fault injection: a call waits 20 ms before it is sent, so each round trip
#         takes 20 ms longer), against the raw TCP stream of the row above;
#  fixed  a 4 MiB gsnap's total time, command to verified report (the job's fixed cost),
#         the median of ROUNDS;
#  incremental  after a gsnap P -> S, 1 % of P's tracks (random ones) change; the next
#         gsnap of P and S (only the changed tracks), command to verified report, against
#         `rsync --inplace --no-whole-file` of the same change between two files; wire
#         bytes are the loopback interface's bytes during the job (every call between the
#         nodes, the CLI's and the heartbeats included) and rsync's own count.
#
# Usage: bash bench/gsnap.sh [SIZE_GIB]   (default 4)
# Environment: SECTIONS (default "full delay fixed"), ROUNDS (default 5), TANDEM_BINARY
# (a built tandem binary to use instead of building this tree).
# Prints markdown tables; docs/BENCHMARKS.md holds a recorded run.
set -euo pipefail
cd "$(dirname "$0")/.."
size_gib="${1:-4}"
size_bytes=$((size_gib << 30))
sections=" ${SECTIONS:-full delay fixed incremental} "
rounds="${ROUNDS:-5}"
for tool in qemu-nbd qemu-io nbdcopy socat rsync python3; do
  command -v "$tool" >/dev/null || { echo "bench/gsnap.sh needs $tool (apt-get install -y qemu-utils libnbd-bin socat rsync)" >&2; exit 1; }
done
if [ -n "${TANDEM_BINARY:-}" ]; then
  tandem=$TANDEM_BINARY
else
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/tandem-target}"
  cargo build --release -q -p tandem
  tandem="$CARGO_TARGET_DIR/release/tandem"
fi
work=$(mktemp -d /var/tmp/tandem-gsnap-bench.XXXXXX)
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
export TANDEM_ENDPOINT=127.0.0.1:18200 TANDEM_CERTS="$work/certs"
start_node alpha 18200 18300 --fault-injection --control-plane
alpha_pid=$node_pid
"$tandem" cluster init >/dev/null
wait_registered alpha
start_node beta 18201 18301 --fault-injection --members 127.0.0.1:18200
beta_pid=$node_pid
wait_registered beta

cpu_seconds() { # pid: user + system CPU seconds so far (/proc/PID/stat fields 14 and 15)
  python3 -c "
import os
fields = open('/proc/$1/stat').read().rsplit(')', 1)[1].split()
print((int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK'))"
}
median() { python3 -c "import statistics, sys; print(f'{statistics.median(float(v) for v in sys.argv[1:]):.2f}')" "$@"; }

# A gsnap of SOURCE into TARGET (volumes already made), timed from the command to the
# verified report; sets gsnap_seconds and leaves the report in $work/report.json.
gsnap() { # source intermediate target
  local start
  start=$(seconds)
  "$tandem" gsnap "$1" "$2" "$3" --wait --json >"$work/report.json"
  gsnap_seconds=$(elapsed "$start" "$(seconds)")
  python3 - "$work/report.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
assert report["state"] == "succeeded", report
rounds = report["verification"]
assert rounds and rounds[-1]["matched"], report
PY
}
# The seconds each step of the last report took ("copy 12 s, verify 3 s, ...").
step_times() {
  python3 - "$work/report.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
parts = []
for step in report["steps"]:
    if step["skipped"] or step["finished_unix_seconds"] is None:
        continue
    parts.append(f"{step['step']} {step['finished_unix_seconds'] - step['started_unix_seconds']} s")
print(", ".join(parts))
PY
}

# The source data: incompressible, written once, identical on every side.
"$tandem" volume create p --node alpha --size "$size_bytes" >/dev/null
head -c "$size_bytes" /dev/urandom >"$work/source.raw"
nbdcopy "$work/source.raw" nbd://127.0.0.1:18300/p

if wants full; then
  echo "## gsnap of $size_gib GiB to another node, command to verified report"
  echo
  "$tandem" volume create s --node beta --size "$size_bytes" >/dev/null
  alpha_cpu=$(cpu_seconds "$alpha_pid"); beta_cpu=$(cpu_seconds "$beta_pid")
  gsnap p p-mid s
  tandem_seconds=$gsnap_seconds
  alpha_used=$(python3 -c "print(f'{$(cpu_seconds "$alpha_pid") - $alpha_cpu:.1f}')")
  beta_used=$(python3 -c "print(f'{$(cpu_seconds "$beta_pid") - $beta_cpu:.1f}')")
  steps=$(step_times)

  truncate -s "$size_bytes" "$work/qemu-target.raw"
  qemu-nbd -f raw --cache=writeback --aio=threads --shared=4 --persistent -x src -b 127.0.0.1 -p 18310 "$work/source.raw" & pids+=($!)
  qemu-nbd -f raw --cache=writeback --aio=threads --shared=4 --persistent -x dst -b 127.0.0.1 -p 18311 "$work/qemu-target.raw" & pids+=($!)
  sleep 1
  start=$(seconds)
  nbdcopy nbd://127.0.0.1:18310/src nbd://127.0.0.1:18311/dst
  sync
  nbdcopy_seconds=$(elapsed "$start" "$(seconds)")
  rm -f "$work/qemu-target.raw"

  socat -u TCP-LISTEN:18320,reuseaddr OPEN:"$work/tcp-target.raw",creat,trunc & listener=$!
  sleep 0.5
  start=$(seconds)
  socat -u OPEN:"$work/source.raw" TCP:127.0.0.1:18320
  wait "$listener"
  sync
  tcp_seconds=$(elapsed "$start" "$(seconds)")
  rm -f "$work/tcp-target.raw"

  echo "| copy | seconds | MiB/s | tandem ÷ it (throughput) |"
  echo "|---|---|---|---|"
  for row in "tandem gsnap (snap, QUIC pair, copy, both digests, activate, end)|$tandem_seconds" "nbdcopy between two qemu-nbd|$nbdcopy_seconds" "raw TCP stream (socat)|$tcp_seconds"; do
    name=${row%%|*}; secs=${row#*|}
    echo "| $name | $secs | $(mib_per_second "$size_bytes" "$secs") | $(python3 -c "print(f'{$secs / $tandem_seconds:.2f}')") |"
  done
  echo
  echo "tandem against the raw TCP stream: $(python3 -c "print(f'{$tcp_seconds / $tandem_seconds:.2f}')")× (goal ≥ 0.8×). The job's steps: $steps. CPU seconds during the job: alpha $alpha_used, beta $beta_used (of $(python3 -c "print(f'{2 * $tandem_seconds:.0f}')") on 2 cores)."
  echo
fi

if wants delay; then
  echo "## The same gsnap with 20 ms more round trip between the nodes"
  echo
  "$tandem" volume create s-far --node beta --size "$size_bytes" >/dev/null
  "$tandem" debug fault --peer beta --delay-ms 20 >/dev/null
  TANDEM_ENDPOINT=127.0.0.1:18201 "$tandem" debug fault --peer alpha --delay-ms 20 >/dev/null
  gsnap p p-mid2 s-far
  "$tandem" debug fault --peer beta >/dev/null
  TANDEM_ENDPOINT=127.0.0.1:18201 "$tandem" debug fault --peer alpha >/dev/null
  echo "| copy | seconds | MiB/s |"
  echo "|---|---|---|"
  echo "| tandem gsnap, 20 ms added to every call | $gsnap_seconds | $(mib_per_second "$size_bytes" "$gsnap_seconds") |"
  echo
  echo "The job's steps: $(step_times)."
  if [ -n "${tcp_seconds:-}" ]; then
    echo "Against the raw TCP stream above (no delay): $(python3 -c "print(f'{$tcp_seconds / $gsnap_seconds:.2f}')")×."
  fi
  echo
fi

if wants fixed; then
  echo "## A 4 MiB gsnap: the job's fixed cost"
  echo
  "$tandem" volume create small --node alpha --size 4MiB >/dev/null
  head -c $((4 << 20)) "$work/source.raw" | nbdcopy - nbd://127.0.0.1:18300/small
  times=()
  for round in $(seq "$rounds"); do
    "$tandem" volume create "small-far-$round" --node beta --size 4MiB >/dev/null
    gsnap small "small-mid-$round" "small-far-$round"
    times+=("$gsnap_seconds")
  done
  echo "| 4 MiB gsnap | seconds |"
  echo "|---|---|"
  echo "| every round | ${times[*]} |"
  echo "| median | $(median "${times[@]}") |"
  echo
  echo "The last job's steps: $(step_times)."
  echo
fi

if wants incremental; then
  echo "## Incremental gsnap after 1 % of the tracks changed"
  echo
  if ! wants full; then
    "$tandem" volume create s --node beta --size "$size_bytes" >/dev/null
    gsnap p p-mid s
  fi
  tracks=$((size_bytes / 65536))
  changed=$((tracks / 100))
  # The same random tracks change on P (through its NBD export, as a host writes) and
  # in rsync's source file; rsync's destination is the image before the change.
  cp "$work/source.raw" "$work/rsync-target.raw"
  python3 - "$work/source.raw" "$tracks" "$changed" >"$work/changed-tracks" <<'PY'
import os, random, sys
path, tracks, changed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
chosen = sorted(random.Random(12).sample(range(tracks), changed))
with open(path, "r+b") as image:
    for track in chosen:
        image.seek(track * 65536)
        image.write(bytes([track % 251 + 1]) * 65536)
for track in chosen:
    print(track)
PY
  commands=()
  while read -r track; do
    commands+=(-c "write -P $((track % 251 + 1)) $((track * 65536)) 64k")
  done <"$work/changed-tracks"
  qemu-io -f raw "${commands[@]}" -c flush nbd://127.0.0.1:18300/p >/dev/null
  sync
  lo_bytes() { awk '$1 == "lo:" { print $10 }' /proc/net/dev; }
  lo_before=$(lo_bytes)
  gsnap p p-mid s
  lo_after=$(lo_bytes)
  tandem_seconds=$gsnap_seconds
  sent=$(python3 -c "import json; print(json.load(open('$work/report.json'))['send']['tracks'])")
  mode=$(python3 -c "import json; print(json.load(open('$work/report.json'))['send']['mode'])")
  [ "$mode" = incremental ] || { echo "the second gsnap was not incremental" >&2; exit 1; }
  [ "$sent" = "$changed" ] || { echo "the second gsnap sent $sent tracks, not $changed" >&2; exit 1; }
  changed_bytes=$((changed * 65536))
  start=$(seconds)
  rsync --inplace --no-whole-file --ignore-times --stats "$work/source.raw" "$work/rsync-target.raw" >"$work/rsync.out"
  sync
  rsync_seconds=$(elapsed "$start" "$(seconds)")
  cmp "$work/source.raw" "$work/rsync-target.raw"
  rsync_bytes=$(awk -F': ' '/Total bytes sent/ { gsub(",", "", $2); print $2 }' "$work/rsync.out")
  rm -f "$work/rsync-target.raw"
  echo "$changed of $tracks tracks changed ($((changed_bytes >> 20)) MiB)."
  echo
  echo "| copy | seconds | wire bytes | wire ÷ changed bytes | rsync ÷ tandem (time) |"
  echo "|---|---|---|---|---|"
  echo "| tandem incremental gsnap ($sent tracks sent) | $tandem_seconds | $((lo_after - lo_before)) (loopback) | $(python3 -c "print(f'{($lo_after - $lo_before) / $changed_bytes:.2f}')") | $(python3 -c "print(f'{$rsync_seconds / $tandem_seconds:.1f}')") |"
  echo "| rsync --inplace --no-whole-file | $rsync_seconds | $rsync_bytes (rsync's count) | $(python3 -c "print(f'{$rsync_bytes / $changed_bytes:.2f}')") | 1.0 |"
  echo
  echo "The job's steps: $(step_times)."
  echo
fi
