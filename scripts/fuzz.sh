#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for a fixed time each, starting
# from the seed corpora in fuzz/corpus/ (kept read-only: libFuzzer writes the
# inputs it discovers to a work directory instead). Needs the nightly
# toolchain and cargo-fuzz; both are installed when missing.
#
#   scripts/fuzz.sh            # 20 s per target (what CI runs)
#   scripts/fuzz.sh 1800       # the long run: 30 minutes per target
#   scripts/fuzz.sh 600 entry_decode path_policy
#
# A crash leaves the input in fuzz/artifacts/<target>/; replay it with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# then add it to the target's regression seeds (fuzz/corpus/<target>/) and a
# unit test before fixing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(entry_decode snapshot_decode path_policy delta_apply config_parse)
fi
if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
# Nightly and sanitizer builds share nothing with the product's target dir.
export CARGO_TARGET_DIR="${CLUSTERD_FUZZ_TARGET_DIR:-/var/tmp/clusterd-fuzz-target}"
cargo +nightly fuzz build
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  echo "fuzzing $t for ${seconds}s"
  if ! cargo +nightly fuzz run "$t" "$work/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 \
      >"$work/$t.log" 2>&1; then
    tail -40 "$work/$t.log" >&2
    echo "fuzz target $t failed: the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|Done)' "$work/$t.log" || tail -3 "$work/$t.log"
done
