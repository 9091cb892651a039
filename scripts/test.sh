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
if [ "${MEMGOV_BALLISTA:-0}" = 1 ]; then
    echo "== ballista-governor (a workspace of its own: Ballista needs DataFusion's default features)"
    # Same target dir: its DataFusion has other features, so its artifacts get other hashes
    # and evict nothing of the main build. Opt-in: its cold debug build took 36 minutes on
    # the 2-core machine (README, "Beyond one machine"), which would take CI past its hour.
    (cd ballista-governor && cargo test --all-targets && cargo test --doc)
else
    echo "== ballista-governor skipped (MEMGOV_BALLISTA=1 runs its tests; see README)"
fi
echo "== loom model of the ledger"
# Its own target dir: --cfg loom changes every crate's flags, and sharing would evict the
# normal build from the cache.
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$target/loom" \
    cargo test -p governor-core --lib --no-default-features loom
