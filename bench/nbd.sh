#!/usr/bin/env bash
# NBD benchmark: the same fio jobs (ioengine=nbd) against a tandem export and against
# qemu-nbd exporting a raw file on the same disk, run back to back in one script so the
# ratio compares like with like. Durability is the same for both: writes are acknowledged
# once handed to the kernel (tandem: RocksDB's write-ahead log; qemu-nbd: the page cache,
# --cache=writeback), and FLUSH makes them durable (tandem: WAL fsync; qemu-nbd: fdatasync).
# Each job ends with a flush (end_fsync=1); the "sync" job flushes after every write.
#
# Usage: bash bench/nbd.sh [RUNTIME_SECONDS]   (default 20)
# Prints a markdown table; docs/BENCHMARKS.md holds a recorded run.
set -euo pipefail
cd "$(dirname "$0")/.."
runtime_seconds="${1:-20}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/tandem-target}"
cargo build --release -q -p tandem
tandem="$CARGO_TARGET_DIR/release/tandem"
work=$(mktemp -d /var/tmp/tandem-bench.XXXXXX)
cleanup() {
  [ -n "${node_pid:-}" ] && kill "$node_pid" 2>/dev/null || true
  [ -n "${qemu_pid:-}" ] && kill "$qemu_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

volume_bytes=$((2 << 30))
"$tandem" init --dir "$work/certs" --nodes bench >/dev/null
"$tandem" node --config "$work/certs/bench.toml" --data-dir "$work/tandem-data" \
  --listen 127.0.0.1:17100 --nbd 127.0.0.1:17809 --metrics 127.0.0.1:17900 >"$work/node.out" 2>"$work/node.err" &
node_pid=$!
for _ in $(seq 50); do grep -q serving "$work/node.out" 2>/dev/null && break; sleep 0.2; done
TANDEM_ENDPOINT=127.0.0.1:17100 TANDEM_CERTS="$work/certs" "$tandem" cluster init >/dev/null
TANDEM_ENDPOINT=127.0.0.1:17100 TANDEM_CERTS="$work/certs" "$tandem" volume create bench --size "$volume_bytes" >/dev/null

truncate -s "$volume_bytes" "$work/qemu.raw"
qemu-nbd -f raw --cache=writeback --aio=threads --shared=16 --persistent -x bench -b 127.0.0.1 -p 17810 "$work/qemu.raw" &
qemu_pid=$!
sleep 1

# Lay the data down first so reads and overwrites meet stored data on both sides.
fill() {
  fio --name=fill --ioengine=nbd --uri="$1" --rw=write --bs=1M --iodepth=8 --size=1G --end_fsync=1 --output-format=terse >/dev/null
}
fill "nbd://127.0.0.1:17809/bench"
fill "nbd://127.0.0.1:17810/bench"

# job name, fio arguments
jobs=(
  "4k randwrite QD1|--rw=randwrite --bs=4k --iodepth=1"
  "4k randwrite QD16|--rw=randwrite --bs=4k --iodepth=16"
  "4k randwrite QD1, flush each|--rw=randwrite --bs=4k --iodepth=1 --fsync=1"
  "1M seq write QD8|--rw=write --bs=1M --iodepth=8"
  "1M seq read QD8|--rw=read --bs=1M --iodepth=8"
  "4k randread QD16|--rw=randread --bs=4k --iodepth=16"
)

# Prints "IOPS MiB/s p99-latency-µs" for one job against one URI.
measure() {
  local uri=$1; shift
  # shellcheck disable=SC2086
  fio --name=job --ioengine=nbd --uri="$uri" --size=1G --time_based --runtime="$runtime_seconds" \
      --ramp_time=2 --end_fsync=1 --randrepeat=0 $* --output-format=json --output="$work/fio.json" >/dev/null
  python3 - "$work/fio.json" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
side = job["write"] if job["write"]["io_bytes"] > job["read"]["io_bytes"] else job["read"]
percentiles = side.get("clat_ns", {}).get("percentile", {})
p99 = percentiles.get("99.000000", 0) / 1000
print(f'{side["iops"]:.0f} {side["bw_bytes"] / 2**20:.1f} {p99:.0f}')
PY
}

echo "| job | tandem IOPS | tandem MiB/s | tandem p99 µs | qemu-nbd IOPS | qemu-nbd MiB/s | qemu-nbd p99 µs | ratio (IOPS) |"
echo "|---|---|---|---|---|---|---|---|"
for entry in "${jobs[@]}"; do
  name=${entry%%|*}
  arguments=${entry#*|}
  read -r t_iops t_bw t_p99 < <(measure "nbd://127.0.0.1:17809/bench" $arguments)
  read -r q_iops q_bw q_p99 < <(measure "nbd://127.0.0.1:17810/bench" $arguments)
  ratio=$(python3 -c "print(f'{$t_iops / max($q_iops, 1):.2f}')")
  echo "| $name | $t_iops | $t_bw | $t_p99 | $q_iops | $q_bw | $q_p99 | $ratio |"
done
