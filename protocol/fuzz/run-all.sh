#!/usr/bin/env bash
# Runs every cargo-fuzz target of the protocol crate for SECONDS seconds each, on the
# stable toolchain (--sanitizer none needs no nightly features), and exits non-zero if any
# target crashes, hangs or fails to build.
#
# usage: protocol/fuzz/run-all.sh SECONDS
#
# New inputs libFuzzer finds go to a scratch directory, so the committed seed corpus in
# corpus/<target>/ stays as it is; crashing inputs are kept in artifacts/<target>/.
# Honours CARGO_TARGET_DIR and CARGO_BUILD_JOBS like any cargo command.
set -euo pipefail

seconds="${1:-}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 SECONDS (a positive whole number of seconds per target)" >&2
    exit 2
fi

cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing; installing it from crates.io" >&2
    cargo install cargo-fuzz --locked
fi

# Build every target first, so a build failure is reported as such and not as a crash.
cargo fuzz build --sanitizer none

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

passed=0
failed=0
failed_targets=()
for target in $(cargo fuzz list); do
    mkdir -p "$scratch/$target" "corpus/$target"
    echo "=== fuzzing $target for ${seconds}s"
    # -timeout: an input that runs for 10 s is a hang and fails the run.
    if cargo fuzz run --sanitizer none "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failed_targets+=("$target")
        echo "=== $target FAILED: the crashing input is in protocol/fuzz/artifacts/$target/" >&2
    fi
done

echo "fuzz: $passed passed, $failed failed"
if ((failed > 0)); then
    echo "failed targets: ${failed_targets[*]}" >&2
    exit 1
fi
