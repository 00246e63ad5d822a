#!/usr/bin/env bash
# Runs every fuzz target for a while (default 60 s each), starting from the
# seeds in fuzz/seeds. Needs cargo-fuzz (`cargo install cargo-fuzz`); on a
# stable toolchain RUSTC_BOOTSTRAP=1 lets it use the sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
for target in token_response jwt_exp state_file header_rewrite; do
  mkdir -p "corpus/$target"
  RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 2>&1 | grep -E "stat::number_of_executed_units|Done|ERROR|panicked" || true
done
