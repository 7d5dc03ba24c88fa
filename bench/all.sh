#!/usr/bin/env bash
# Every data-path benchmark of issue 14 in one run, and one table of ratios against their
# goals, so that a change can be checked in one command. Runs bench/nbd.sh (fio against
# tandem and qemu-nbd) and bench/copy.sh's full, resync and sync sections (against socat,
# rsync and a volume without a mirror), keeps their own tables, and reads the measures
# off them: each ratio compares tandem with a peer run in the same script, back to back.
#
# Usage: bash bench/all.sh [FIO_SECONDS] [SIZE_GIB]   (defaults 10 and 2)
# Environment: BENCH_OUTPUT (a directory to keep the two scripts' tables in; default a
# temporary one, removed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
fio_seconds="${1:-10}"
size_gib="${2:-2}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/tandem-target}"
# Checked before anything runs: the copy benchmarks come after minutes of fio.
for tool in fio qemu-nbd nbdcopy socat rsync python3; do
  command -v "$tool" >/dev/null || { echo "bench/all.sh needs $tool (apt-get install -y qemu-utils libnbd-bin fio socat rsync)" >&2; exit 1; }
done
if [ -n "${BENCH_OUTPUT:-}" ]; then
  output=$BENCH_OUTPUT
  mkdir -p "$output"
else
  output=$(mktemp -d /var/tmp/tandem-bench-all.XXXXXX)
  trap 'rm -rf "$output"' EXIT
fi

echo "bench/all.sh: bench/nbd.sh $fio_seconds, then bench/copy.sh $size_gib (full resync sync); tables in $output" >&2
bash bench/nbd.sh "$fio_seconds" | tee "$output/nbd.md" >&2
SECTIONS="full resync sync" bash bench/copy.sh "$size_gib" | tee "$output/copy.md" >&2

python3 - "$output/nbd.md" "$output/copy.md" <<'PY'
import sys

def rows(path):
    """The cells of every table row of a markdown file, by the row's first cell."""
    table = {}
    for line in open(path):
        line = line.strip()
        if line.startswith("|") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            table[cells[0]] = cells
    return table

nbd = rows(sys.argv[1])
copy = rows(sys.argv[2])
results = []

def nbd_row(job, goal_ratio, with_p99=False, label=None):
    row = nbd.get(job)
    if row is None:
        results.append((label or job, "missing", "", "", f">= {goal_ratio}x", "no"))
        return
    tandem_iops, tandem_mib, tandem_p99 = float(row[1]), float(row[2]), float(row[3])
    peer_iops, peer_mib, peer_p99 = float(row[4]), float(row[5]), float(row[6])
    ratio = tandem_iops / max(peer_iops, 1)
    met = ratio >= goal_ratio
    goal = f">= {goal_ratio}x"
    tandem_text = f"{tandem_mib:.0f} MiB/s, {tandem_iops:.0f} IOPS, p99 {tandem_p99:.0f} µs"
    peer_text = f"qemu-nbd {peer_mib:.0f} MiB/s, {peer_iops:.0f} IOPS, p99 {peer_p99:.0f} µs"
    ratio_text = f"{ratio:.2f}x"
    if with_p99:
        p99_ratio = tandem_p99 / max(peer_p99, 1)
        met = met and p99_ratio <= 2
        goal += ", p99 <= 2x the peer's"
        ratio_text += f" (p99 {p99_ratio:.1f}x)"
    results.append((label or f"fio {job}", tandem_text, peer_text, ratio_text, goal, "yes" if met else "no"))

nbd_row("1M seq write QD8", 0.8, with_p99=True)
nbd_row("1M seq read QD8", 0.8)
nbd_row("4k randread QD16", 0.8)
nbd_row("4k randwrite QD1", 0.95, label="fio 4k randwrite QD1 (kept)")
nbd_row("4k randwrite QD16", 0.95, label="fio 4k randwrite QD16 (kept)")
nbd_row("4k randwrite QD1, flush each", 0.95, label="fio 4k randwrite QD1, flush each (kept)")

tandem_copy = copy.get("tandem mirror establish (QUIC, node to node)")
socat = copy.get("raw TCP stream (socat)")
if tandem_copy and socat:
    ratio = float(socat[1]) / float(tandem_copy[1])
    results.append(("full copy to another node", f"{tandem_copy[2]} MiB/s",
                    f"raw TCP (socat) {socat[2]} MiB/s", f"{ratio:.2f}x", ">= 0.8x",
                    "yes" if ratio >= 0.8 else "no"))
else:
    results.append(("full copy to another node", "missing", "", "", ">= 0.8x", "no"))

resync = copy.get("tandem mirror reestablish")
rsync = copy.get("rsync --inplace --no-whole-file")
if resync and rsync:
    ratio = float(rsync[1]) / float(resync[1])
    results.append(("1 % incremental resync", f"{resync[1]} s", f"rsync --inplace {rsync[1]} s",
                    f"{ratio:.1f}x faster", ">= 20x", "yes" if ratio >= 20 else "no"))
else:
    results.append(("1 % incremental resync", "missing", "", "", ">= 20x", "no"))

mirrored = copy.get("sync mirror on another node")
plain = copy.get("no mirror")
if mirrored and plain:
    ratio = float(mirrored[1]) / max(float(plain[1]), 1)
    results.append(("sync mirror 4k write QD1, p50", f"{mirrored[1]} µs",
                    f"no mirror {plain[1]} µs", f"{ratio:.1f}x", "<= 3x",
                    "yes" if ratio <= 3 else "no"))
else:
    results.append(("sync mirror 4k write QD1, p50", "missing", "", "", "<= 3x", "no"))

print("| measure | tandem | peer | ratio | goal | met |")
print("|---|---|---|---|---|---|")
for result in results:
    print("| " + " | ".join(result) + " |")
met = sum(1 for result in results if result[5] == "yes")
print(f"\n{met} of {len(results)} goals met")
PY
