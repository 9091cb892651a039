#!/usr/bin/env bash
# Runs every test of the workspace: unit, integration, doc tests, benches in test mode,
# and the loom model of the admission ledger. Debug builds only (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
target="${CARGO_TARGET_DIR:-$PWD/target}"

echo "== cargo test (unit, integration, examples, benches in test mode)"
cargo test --workspace --all-targets
echo "== cargo test --doc"
cargo test --workspace --doc
echo "== loom model of the ledger"
# Its own target dir: --cfg loom changes every crate's flags, and sharing would evict the
# normal build from the cache.
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$target/loom" \
    cargo test -p governor-core --lib --no-default-features loom
