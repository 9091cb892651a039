#!/usr/bin/env bash
# The main job: the mixed workload (vector search + bulk timeseries ingest + SQL GROUP BY)
# under one memory governor, on embedded in-process data with a temp dir for spills and segments.
# Extra arguments go to the binary (`--small`, `--json PATH`, `--help` lists them all).
#
# It uses the dev profile, whose dependencies are built at opt-level 1 (see Cargo.toml), so it
# shares the test suite's build; MEMGOV_PROFILE=release builds an optimised binary instead
# (a cold release build of DataFusion takes ~20 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
profile="${MEMGOV_PROFILE:-dev}"
target="${CARGO_TARGET_DIR:-$PWD/target}"
if [ "$profile" = dev ]; then
    # Built the way scripts/test.sh builds it (the whole workspace, every target, so the same
    # dependency features): after the tests, this compiles nothing. `cargo run -p tests` would
    # resolve features for one package and compile DataFusion a second time.
    cargo build --workspace --all-targets
    exec "$target/debug/mixed_workload" "$@"
fi
exec cargo run --profile "$profile" -p tests --bin mixed_workload -- "$@"
