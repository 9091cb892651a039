#!/usr/bin/env bash
# The main job: the mixed workload (vector search + bulk timeseries ingest + SQL GROUP BY)
# under one memory governor, on embedded in-process data with a temp dir for spills and segments.
# Extra arguments go to the binary (`--small`, `--prometheus`, `--help`).
#
# It uses the dev profile, whose dependencies are built at opt-level 1 (see Cargo.toml), so it
# shares the test suite's build; MEMGOV_PROFILE=release builds an optimised binary instead
# (a cold release build of DataFusion takes ~20 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
profile="${MEMGOV_PROFILE:-dev}"
exec cargo run --profile "$profile" -p tests --bin mixed_workload -- "$@"
