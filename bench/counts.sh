#!/usr/bin/env bash
# What `list` and `show` pay to count a session's remaining tracks: the kept counts
# against a whole-bitmap scan (what every reading did before), on RocksDB, with host
# writes between readings. Usage: bash bench/counts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/tandem-target}"
cargo run --release -q -p node --example counts
