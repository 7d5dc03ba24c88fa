#!/usr/bin/env bash
# Builds the `tandem:local` image FROM scratch: the release binary plus the shared
# libraries `ldd` names (glibc, libstdc++ for RocksDB), and empty /data, /certs and /tmp.
# Usage: bash docker/build-image.sh          (TANDEM_BINARY=PATH to use a built binary)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/tandem-target}"
# TANDEM_BINARY: an already built binary to use instead (CI uses the one its tests
# built, so the image costs no second build of the workspace).
if [ -n "${TANDEM_BINARY:-}" ]; then
  binary="$TANDEM_BINARY"
else
  cargo build --release -q -p tandem
  binary="$CARGO_TARGET_DIR/release/tandem"
fi
rootfs=docker/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/data" "$rootfs/certs" "$rootfs/tmp"
chmod 1777 "$rootfs/tmp"
# Without debug line tables: the image carries the program, not its symbols.
strip -o "$rootfs/usr/local/bin/tandem" "$binary"
# Every library the binary loads, at the path the loader looks for it.
ldd "$binary" | awk '$2 == "=>" { print $3 } $1 ~ /^\// { print $1 }' | while read -r library; do
  [ -f "$library" ] || continue
  mkdir -p "$rootfs$(dirname "$library")"
  cp -L "$library" "$rootfs$library"
done
DOCKER_BUILDKIT=0 docker build -q -t tandem:local docker >/dev/null 2>&1
echo "built tandem:local ($(du -sh "$rootfs" | cut -f1) of files)"
